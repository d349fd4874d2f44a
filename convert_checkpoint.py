"""
Rewrite a checkpoint of an earlier version of this repo in the safe form that train.py, sample.py, compare.py and
bench.py now require: tensors, numbers, strings, lists and dicts only, loadable with torch.load(weights_only=True),
so that opening it can never run code.

    python convert_checkpoint.py --i-trust-this-file out-deepseek_moe/ckpt.pt

Only for a file you made yourself: reading the old form unpickles whatever objects the file names, and a crafted
file can run any command that way. The old file is kept beside the new one as ckpt.pt.pickled. What changes: the
torch, CUDA, numpy and Python RNG states are dropped (a run now derives each step's randomness from
(seed, rank, iteration), so a resume needs none); the rest is kept as it is, and must then load safely.
"""

import argparse
import io
import os
import shutil
import sys

import torch

from model import read_checkpoint
from train import save_checkpoint

OLD_RNG_KEYS = ('torch_rng_state', 'cuda_rng_state', 'numpy_rng_state', 'python_rng_state')


def convert(path: str) -> list[str]:
    """Rewrite the trusted checkpoint at path in the safe form (the original kept as path + '.pickled'); returns
    the keys dropped. Raises ValueError, and writes nothing, if what is left would still not load safely."""
    ckpt = read_checkpoint(path, trusted=True)
    dropped = [k for k in OLD_RNG_KEYS if k in ckpt]
    safe = {k: v for k, v in ckpt.items() if k not in OLD_RNG_KEYS}
    buffer = io.BytesIO()
    torch.save(safe, buffer)
    buffer.seek(0)
    try:
        torch.load(buffer, weights_only=True)            # what every script will do with it
    except Exception as e:
        raise ValueError(f"{path} still holds something other than tensors, numbers, strings, lists and dicts after "
                         f"dropping {dropped or 'nothing'} ({str(e).splitlines()[0][:120]}); not converted") from None
    shutil.copy2(path, path + '.pickled')
    save_checkpoint(safe, path)
    return dropped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('checkpoint', help="a ckpt.pt written by an earlier version of this repo's train.py")
    parser.add_argument('--i-trust-this-file', action='store_true', dest='trusted',
                        help="required: you made this file yourself (reading the old form can run code)")
    args = parser.parse_args()
    if not args.trusted:
        sys.exit("error: reading a checkpoint in the old form unpickles it, which can run code; convert only a file "
                 "you made yourself, and say so with --i-trust-this-file")
    try:
        dropped = convert(args.checkpoint)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"{args.checkpoint}: rewritten in the safe form (dropped {', '.join(dropped) or 'nothing'}); "
          f"the original is {os.path.basename(args.checkpoint)}.pickled beside it")


if __name__ == '__main__':
    main()
