"""
Where one FFN layer's time goes: torch.profiler over forward + backward of the FFN of the first block of a model
built from the config files (as train.py builds it, initialised as in training), per operator, in ms per step.

    python bench/profile_layer.py                                   # 4 layers' size: n_embd 128, 16 x 128 tokens, 1 thread
    python bench/profile_layer.py --n_embd 128 --batch_size 16 --block_size 128 config/deepseek_moe.py

Set MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 on Linux (bench/RESULTS.md). The layers
are profiled one after another, so the times of different layers are only roughly comparable (bench.py's
interleaved rounds give the ratios); what a profile shows well is the split of one layer's time between operators.
"""

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import config_of, ffn_step, first_ffn  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('configs', nargs='*', default=['config/dense.py', 'config/moe.py', 'config/deepseek_moe.py'])
    parser.add_argument('--n_embd', type=int, default=128)
    parser.add_argument('--batch_size', type=int, default=16)
    parser.add_argument('--block_size', type=int, default=128)
    parser.add_argument('--steps', type=int, default=10)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--rows', type=int, default=12, help="operators listed per layer")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for config_file in args.configs:
        layer = first_ffn(config_of(config_file, f'--n_embd={args.n_embd}', f'--n_head={max(1, args.n_embd // 32)}',
                                    '--n_layer=1', f'--block_size={args.block_size}', '--vocab_size=256'))
        torch.manual_seed(1)
        x = torch.randn(args.batch_size, args.block_size, args.n_embd, requires_grad=True)
        step = ffn_step(layer, x, torch.randn_like(x))
        for _ in range(3):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events) / 1000 / args.steps
        print(f"\n### {config_file}: {total:.1f} ms per forward + backward (self CPU time, {args.steps} steps)\n")
        print("| operator | ms per step | calls per step | share |")
        print("|---|---:|---:|---:|")
        for e in events[:args.rows]:
            ms = e.self_cpu_time_total / 1000 / args.steps
            print(f"| `{e.key}` | {ms:.2f} | {e.count / args.steps:g} | {ms / total:.0%} |")


if __name__ == '__main__':
    main()
