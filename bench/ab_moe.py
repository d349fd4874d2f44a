"""
Two versions of moe.py, timed against each other in one process: the FFN layers of config/moe.py and
config/deepseek_moe.py, built once with each version's MoE class from the same weights, and the dense layer of
config/dense.py, interleaved round by round (rotated order), each as a ratio to dense. For checking that a change
to the dispatch pays, on the machine it is meant for.

    git show 77767b0:moe.py > /tmp/moe_before.py
    python bench/ab_moe.py /tmp/moe_before.py moe.py --rounds 30

Forward + backward of one layer on 16 x 128 tokens at n_embd 128, one thread (the CPU size, config/tinystories_cpu.py).
Both versions must take MoE(config, shared_experts) and return (y, aux) from forward(x).
"""

import argparse
import importlib.util
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import config_of, ffn_step, first_ffn, interleaved_times, median_ratio  # noqa: E402


def load_module(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def layer_step(layer: torch.nn.Module, args):
    """forward + backward of layer on fixed random tokens (bench.ffn_step)."""
    torch.manual_seed(1)
    x = torch.randn(args.batch_size, args.block_size, args.n_embd, requires_grad=True)
    return ffn_step(layer, x, torch.randn_like(x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('a', help="moe.py of version a (e.g. before a change)")
    parser.add_argument('b', help="moe.py of version b")
    parser.add_argument('--n_embd', type=int, default=128)
    parser.add_argument('--batch_size', type=int, default=16)
    parser.add_argument('--block_size', type=int, default=128)
    parser.add_argument('--rounds', type=int, default=30)
    parser.add_argument('--threads', type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    versions = {'a': load_module(args.a, 'moe_a'), 'b': load_module(args.b, 'moe_b')}
    fns = {}
    for name in ('dense', 'moe', 'deepseek_moe'):
        cfg = config_of(f'config/{name}.py', f'--n_embd={args.n_embd}', '--n_layer=1',
                        f'--n_head={max(1, args.n_embd // 32)}', f'--block_size={args.block_size}')
        ffn = first_ffn(cfg)                                 # initialised as in training
        if name == 'dense':
            fns['dense'] = layer_step(ffn, args)
            continue
        for tag, module in versions.items():
            layer = module.MoE(cfg, shared_experts=ffn.shared_experts)
            layer.load_state_dict(ffn.state_dict())          # the same weights in both versions
            fns[f'{name} ({tag})'] = layer_step(layer, args)
    times = interleaved_times(fns, warmup=3, rounds=args.rounds, device='cpu')
    print(f"a = {args.a}, b = {args.b}; one FFN layer, forward + backward, {args.batch_size}x{args.block_size} tokens, "
          f"n_embd {args.n_embd}, {args.threads} thread(s), median of {args.rounds} interleaved rounds\n")
    print("| layer | ms | layer / dense |")
    print("|---|---:|---:|")
    for name, t in times.items():
        print(f"| {name} | {1000 * statistics.median(t):.2f} | {median_ratio(t, times['dense']):.3f}x |")


if __name__ == '__main__':
    main()
