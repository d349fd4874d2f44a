"""
Sample text from a trained checkpoint.

    python sample.py --out_dir=out-deepseek_moe
    python sample.py --out_dir=out-moe --start="Once upon a time" --num_samples=3 --max_new_tokens=200
    python sample.py --out_dir=out-dense --start=FILE:prompt.txt --temperature=0.7 --top_k=100
"""

import os
import sys

import torch

from configurator import configure
from dataset import Vocab
from model import load_checkpoint
from runtime import resolve_runtime

# -----------------------------------------------------------------------------
out_dir = 'out-deepseek_moe'  # the run directory holding ckpt.pt
start = '\n'                  # the prompt, or FILE:path to read it from a file
num_samples = 3
max_new_tokens = 200
temperature = 0.8             # < 1 sharper, > 1 more random
top_k = 200                   # sample only among the top_k most likely tokens; 0 = all
seed = 1337
device = 'auto'               # 'auto' (cuda, else mps, else cpu) | 'cpu' | 'cuda' | 'cuda:1' | 'mps'
dtype = 'auto'                # 'auto' (see runtime.choose_runtime) | 'float32' | 'bfloat16' | 'float16' | 'float64'
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}

if __name__ == '__main__':
    try:
        settings = configure(DEFAULTS, sys.argv[1:])
        globals().update(settings)
        # the same decisions as train.py, for this machine (the checkpoint may come from another one)
        runtime = resolve_runtime(device, dtype, compile=False)
        device, autocast = runtime.device, runtime.autocast()
        model, ckpt = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'), device, moe_dispatch=runtime.moe_dispatch)
        # the vocabulary the model was trained on, recorded in the checkpoint (None: GPT-2's own)
        vocab = Vocab(ckpt.get('data', {}).get('gpt2_ids'))
        if model.config.vocab_size < vocab.vocab_size:
            # data without meta.pkl is taken for GPT-2 ids; a model with fewer rows was trained on ids of another kind
            # (hand-made data), and GPT-2's encoding of a prompt would index past its embedding
            raise ValueError(f"{out_dir}'s model has {model.config.vocab_size:,} token ids, fewer than the "
                             f"{vocab.vocab_size:,} of the vocabulary its data names ({vocab!r}, GPT-2's when the data "
                             f"had no meta.pkl): its ids are not that vocabulary's tokens, so no text can be encoded "
                             f"for it; sample from a model trained on data written by data/*/prepare.py")
        if runtime.dtype == 'float64':
            model.double()
        if start.startswith('FILE:'):
            with open(start[5:], encoding='utf-8') as f:
                start = f.read()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    torch.manual_seed(seed)
    model.eval()
    # an empty prompt starts from <|endoftext|>, the token that separates documents in training
    prompt = vocab.encode(start, allow_eot=True) or [vocab.eot_token]
    x = torch.tensor(prompt, dtype=torch.long, device=device)[None, ...]
    with autocast:
        for _ in range(num_samples):
            # only ids the vocabulary has: the model's may be padded beyond it (GPT-2's 50,257 to 50,304)
            y = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k or None,
                               n_tokens=vocab.vocab_size)
            print(start + vocab.decode(y[0, len(prompt):].tolist()))
            print('---------------')
