"""
TinyStories (Eldan & Li 2023) as GPT-2 tokens: data/tinystories/{train,val}.bin and meta.json.

    python data/tinystories/prepare.py                      # download roneneldan/TinyStories (~1.9 GB of text)
    python data/tinystories/prepare.py --input stories.txt  # local text, a random 0.5% held out for val
    python data/tinystories/prepare.py --input ../shared/data/tinystories/train.txt \\
        --val-input ../shared/data/tinystories/val.txt      # local text with its own validation file

Local files: documents separated by lines holding exactly <|endoftext|>. Full dataset: about 470M
training tokens; the hub's own validation split becomes val.bin.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from prepare_common import hub_unreachable, make_parser, prepare_local, run, write_meta, write_split  # noqa: E402

HUB_NAME = 'roneneldan/TinyStories'


def prepare_hub(args) -> None:
    try:
        from datasets import load_dataset
    except ImportError:
        sys.exit("error: downloading needs Hugging Face datasets (pip install datasets), or use --input FILE")
    try:
        ds = load_dataset(HUB_NAME)                    # splits 'train' and 'validation', column 'text'
    except Exception as e:                             # offline, hub down, proxy: all say the same to the user
        hub_unreachable(HUB_NAME, e)
    os.makedirs(args.out_dir, exist_ok=True)
    counts = {}
    for split, hub_split in (('train', 'train'), ('val', 'validation')):
        part = ds[hub_split]
        counts[split] = write_split((row['text'] for row in part), args.out_dir, split, args.num_proc, len(part))
    write_meta(args.out_dir, counts, {'hub': HUB_NAME, 'splits': {'train': 'train', 'val': 'validation'}})


def main() -> None:
    args = make_parser(__doc__, os.path.dirname(os.path.abspath(__file__))).parse_args()
    prepare_local(args) if args.input else prepare_hub(args)


if __name__ == '__main__':
    run(main)
