"""
OpenWebText (Gokaslan & Cohen 2019) as GPT-2 tokens: data/openwebtext/{train,val}.bin and meta.json.

    python data/openwebtext/prepare.py --shards 2          # the first 2 parquet shards of the hub's copy
    python data/openwebtext/prepare.py --shards 0          # all of it (~54 GB of text, ~9B tokens)
    python data/openwebtext/prepare.py --input ../shared/data/openwebtext/train.txt \\
        --val-input ../shared/data/openwebtext/val.txt      # local text
    python data/openwebtext/prepare.py --shards 2 --vocab 8192   # a compact vocabulary: data/openwebtext_v8192/

The hub path reads the parquet conversion of Skylion007/openwebtext, shard by shard, so a small run
needs only one or two shards; --val-fraction of its documents (random, seeded) become val.bin.
Local files: documents separated by lines holding exactly <|endoftext|>.

--vocab N keeps GPT-2's BPE but only N of its tokens: the 256 byte tokens, <|endoftext|> and the most
frequent others of the training split; any other token is written as its bytes' tokens, so no text is lost.
Web text uses many more tokens than TinyStories, so a small N costs more stream length here; the printed
coverage and growth say how much. The files go to data/openwebtext_v<N>/ with a meta.pkl (read by
dataset.vocab_for_data_dir); train with --dataset=openwebtext_v<N>.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from prepare_common import (hold_out, hub_unreachable, make_parser, parse_args, prepare_local, run,  # noqa: E402
                            write_dataset)

HUB_NAME = 'Skylion007/openwebtext'
PARQUET = f'datasets/{HUB_NAME}@refs%2Fconvert%2Fparquet'   # the hub's parquet conversion of the dataset


def prepare_hub(args) -> None:
    try:
        from datasets import load_dataset
        from huggingface_hub import HfFileSystem
    except ImportError:
        sys.exit("error: downloading needs Hugging Face datasets (pip install datasets), or use --input FILE")
    try:
        shards = sorted(HfFileSystem().glob(f'{PARQUET}/**/*.parquet'))
        if not shards:
            raise FileNotFoundError(f'no parquet files under {PARQUET}')
        shards = shards[:args.shards] if args.shards > 0 else shards
        print(f"{len(shards)} shard(s): {', '.join(os.path.basename(s) for s in shards)}")
        ds = load_dataset('parquet', data_files=['hf://' + s for s in shards], split='train')
    except Exception as e:
        hub_unreachable(HUB_NAME, e)
    train_ids, val_ids = hold_out(len(ds), args.val_fraction, args.seed)
    splits = {split: ((row['text'] for row in ds.select(ids)), len(ids))
              for split, ids in (('train', train_ids), ('val', val_ids))}
    write_dataset(args, splits, {'hub': HUB_NAME, 'parquet_shards': shards,
                                 'val_fraction': args.val_fraction, 'seed': args.seed})


def main() -> None:
    parser = make_parser(__doc__, os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument('--shards', type=int, default=1, help="parquet shards to download; 0 = all")
    args = parse_args(parser)
    prepare_local(args) if args.input else prepare_hub(args)


if __name__ == '__main__':
    run(main)
