"""
Rewrite a checkpoint of an earlier version of this repo in the safe form that train.py, sample.py, compare.py and
bench.py now require: tensors, numbers, strings, lists and dicts only, loadable with torch.load(weights_only=True),
so that opening it can never run code.

    python convert_checkpoint.py --i-trust-this-file out-deepseek_moe/ckpt.pt

Only for a file you made yourself: reading the old form unpickles whatever objects the file names, and a crafted
file can run any command that way. The old file is kept beside the new one as ckpt.pt.pickled. What changes: the
torch, CUDA, numpy and Python RNG states are dropped (a run now derives each step's randomness from
(seed, rank, iteration), so a resume needs none); the auxiliary losses' coefficients are multiplied by the
number of MoE layers, because those versions summed the losses over the layers where this one averages them, so a
resumed run keeps the strength it trained with; the rest is kept as it is, and must then load safely. Two other
changes of that version cannot be converted and change a resumed run: a top-1 standard MoE now gates by the full
softmax's probability (it used 1), and dropout now also reaches the routed experts (it reached the shared ones).
A file already in the safe form is left alone.
"""

import argparse
import io
import os
import shutil
import sys

import torch

from model import read_checkpoint, save_checkpoint

OLD_RNG_KEYS = ('torch_rng_state', 'cuda_rng_state', 'numpy_rng_state', 'python_rng_state')
AUX_COEFS = ('aux_loss_coef', 'balance_loss_coef', 'z_loss_coef', 'seq_aux_coef')


def summed_to_averaged(settings: dict) -> dict:
    """Settings of a run whose auxiliary losses were summed over its MoE layers, with each coefficient multiplied by
    their number: the same strength now that they are averaged."""
    if settings.get('ffn_type', 'dense') == 'dense':
        return settings
    n_moe = settings['n_layer'] - settings.get('n_dense_layers', 0)
    return {k: v * n_moe if k in AUX_COEFS else v for k, v in settings.items()}


def convert(path: str) -> list[str]:
    """Rewrite the trusted checkpoint at path in the safe form (the original kept as path + '.pickled'); returns
    the keys dropped. Raises ValueError, and writes nothing, if what is left would still not load safely."""
    ckpt = read_checkpoint(path, trusted=True)
    dropped = [k for k in OLD_RNG_KEYS if k in ckpt]
    safe = {k: v for k, v in ckpt.items() if k not in OLD_RNG_KEYS}
    safe['model_args'] = summed_to_averaged(ckpt['model_args'])
    if 'config' in ckpt:
        safe['config'] = summed_to_averaged(ckpt['config'])
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
        read_checkpoint(args.checkpoint)                 # safe already (converted before, or written now): leave it
        print(f"{args.checkpoint} is already in the safe form; nothing to do")
        return
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    except ValueError:
        pass
    try:
        dropped = convert(args.checkpoint)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"{args.checkpoint}: rewritten in the safe form (dropped {', '.join(dropped) or 'nothing'}; auxiliary-loss "
          f"coefficients multiplied by the MoE layers, now that the losses are averaged over them); the original is "
          f"{os.path.basename(args.checkpoint)}.pickled beside it")


if __name__ == '__main__':
    main()
