"""
TinyStories (Eldan & Li 2023) as GPT-2 tokens: data/tinystories/{train,val}.bin and meta.json.

    python data/tinystories/prepare.py                      # download roneneldan/TinyStories (~1.9 GB of text)
    python data/tinystories/prepare.py --input stories.txt  # local text, a random 0.5% held out for val
    python data/tinystories/prepare.py --input ../shared/data/tinystories/train.txt \\
        --val-input ../shared/data/tinystories/val.txt      # local text with its own validation file
    python data/tinystories/prepare.py --vocab 4096         # a compact vocabulary: data/tinystories_v4096/

Local files: documents separated by lines holding exactly <|endoftext|>. Full dataset: about 470M
training tokens; the hub's own validation split becomes val.bin.

--vocab N keeps GPT-2's BPE but only N of its tokens: the 256 byte tokens, <|endoftext|> and the most
frequent others of the training split; any other token is written as its bytes' tokens, so no text is lost.
At small model sizes the 50,257-way output layer dominates a step, and the stories use few tokens (the
4,096 most frequent cover about 99% of them). The files go to data/tinystories_v<N>/ with a meta.pkl
(read by dataset.vocab_for_data_dir); train with --dataset=tinystories_v<N>.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from prepare_common import hub_unreachable, make_parser, parse_args, prepare_local, run, write_dataset  # noqa: E402

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
    splits = {split: ((row['text'] for row in ds[hub_split]), len(ds[hub_split]))
              for split, hub_split in (('train', 'train'), ('val', 'validation'))}
    write_dataset(args, splits, {'hub': HUB_NAME, 'splits': {'train': 'train', 'val': 'validation'}})


def main() -> None:
    args = parse_args(make_parser(__doc__, os.path.dirname(os.path.abspath(__file__))))
    prepare_local(args) if args.input else prepare_hub(args)


if __name__ == '__main__':
    run(main)
