"""
Compare training runs: validation loss, expert load, and which experts tokens are routed to.

    python compare.py                                  # every out*/ run dir here -> compare_out/
    python compare.py out-dense out-moe out-deepseek_moe --out results
    python compare.py --routing out-deepseek_moe --text "Once upon a time, Lily found a red ball."

Writes val_loss.png, expert_selection.png, maxvio.png and summary.md (also printed). Every number comes
from the runs' metrics.jsonl (written by train.py); losses are pure cross-entropy. --routing loads a
checkpoint and writes routing.png (token x expert gate values in one layer) and top_tokens.md (the
most frequent tokens each expert receives on validation data).
"""

import argparse
import glob
import json
import os
import statistics
import sys
from collections import Counter

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from moe import max_vio  # noqa: E402


# -----------------------------------------------------------------------------
# reading runs


def read_metrics(path: str) -> list[dict]:
    """The rows of a metrics.jsonl; a line that is not valid JSON (a run killed mid-write) is skipped
    with a warning. A missing file reads as no rows."""
    rows = []
    if not os.path.isfile(path):
        return rows
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"warning: {path}:{n} is not valid JSON (truncated?); skipped", file=sys.stderr)
    return rows


def load_run(run_dir: str) -> dict | None:
    """A run's rows grouped by type, its latest config row and a label; None (with a warning) if unusable."""
    path = os.path.join(run_dir, 'metrics.jsonl')
    rows = read_metrics(path)
    configs = [r for r in rows if r.get('type') == 'config']
    evals = [r for r in rows if r.get('type') == 'eval' and r.get('val_loss') is not None]
    if not configs or not evals:
        print(f"warning: {path} is missing or has no config/eval rows; run skipped", file=sys.stderr)
        return None
    cfg = configs[-1]
    # a resumed run repeats no iteration, but keep the last row of any iteration seen twice
    evals = list({r['iter']: r for r in evals}.values())
    args = cfg['model_args']
    ffn = args['ffn_type']
    if ffn == 'dense':
        desc = f"dense {args['ffn_hidden']}"
    else:
        shared = f"{args['n_shared_experts']} shared + " if args['n_shared_experts'] else ''
        desc = f"{ffn}, {shared}{args['n_experts']} routed, top-{args['top_k']}"
    return {
        'dir': run_dir, 'name': os.path.basename(os.path.normpath(run_dir)), 'label': f"{os.path.basename(os.path.normpath(run_dir))} ({desc})",
        'config': cfg, 'ffn_type': ffn, 'evals': evals,
        'train': [r for r in rows if r.get('type') == 'train'],
        'selection': next((r for r in reversed(rows) if r.get('type') == 'expert_selection'), None),
    }


# -----------------------------------------------------------------------------
# metric math: small pure functions


def load_shares(counts: list[list[float]]) -> list[list[float]]:
    """Per layer, the share of token-slots each expert received (each layer's shares sum to 1)."""
    return [[c / sum(layer) if sum(layer) else 0.0 for c in layer] for layer in counts]


def mean_maxvio(counts: list[list[float]]) -> float:
    """MaxVio (max load / mean load - 1) of each layer, averaged over layers."""
    return float(max_vio(torch.tensor(counts, dtype=torch.float64)).mean())


def summary_row(run: dict) -> dict:
    """The numbers of one run for the summary table (None where a run has no such number)."""
    evals, cfg = run['evals'], run['config']
    moe_evals = [r for r in evals if r.get('expert_counts')]
    speeds = [r['tokens_per_s'] for r in run['train'] if r.get('tokens_per_s')]
    last_moe = moe_evals[-1] if moe_evals else None
    return {
        'run': run['name'], 'ffn_type': run['ffn_type'],
        'total_params': cfg['total_params'], 'active_params': cfg['active_params'],
        'best_val_loss': min(r['val_loss'] for r in evals), 'final_val_loss': evals[-1]['val_loss'],
        'final_iter': evals[-1]['iter'],
        'tokens_per_s': statistics.median(speeds) if speeds else evals[-1].get('tokens_per_s'),
        'final_maxvio': mean_maxvio(last_moe['expert_counts']) if last_moe else None,
        'dropped_share': float(np.mean(last_moe['dropped_frac'])) if last_moe and last_moe.get('dropped_frac') else None,
    }


def markdown_table(rows: list[dict]) -> str:
    def fmt(v, spec):
        return '-' if v is None else format(v, spec)
    lines = ['| run | FFN | total params | active params | best val loss | final val loss (iter) | tokens/s | final MaxVio | dropped |',
             '|---|---|---:|---:|---:|---:|---:|---:|---:|']
    for r in rows:
        dropped = '-' if r['dropped_share'] is None else f"{100 * r['dropped_share']:.2f}%"
        lines.append(f"| {r['run']} | {r['ffn_type']} | {r['total_params'] / 1e6:.2f}M | {r['active_params'] / 1e6:.2f}M | "
                     f"{r['best_val_loss']:.4f} | {r['final_val_loss']:.4f} ({r['final_iter']}) | {fmt(r['tokens_per_s'], ',.0f')} | "
                     f"{fmt(r['final_maxvio'], '.3f')} | {dropped} |")
    return '\n'.join(lines)


# -----------------------------------------------------------------------------
# figures


def plot_val_loss(runs: list[dict], colors: dict, path: str) -> None:
    per_iter = {r['config']['tokens_per_iter'] for r in runs}
    ncols = 2 if len(per_iter) > 1 else 1            # different batch sizes: also against tokens seen
    fig, axes = plt.subplots(1, ncols, figsize=(7 * ncols, 4.5), squeeze=False)
    for run in runs:
        it = [r['iter'] for r in run['evals']]
        loss = [r['val_loss'] for r in run['evals']]
        axes[0, 0].plot(it, loss, marker='.', color=colors[run['dir']], label=run['label'])
        if ncols == 2:
            axes[0, 1].plot([r['tokens'] / 1e6 for r in run['evals']], loss, marker='.', color=colors[run['dir']])
    axes[0, 0].set(xlabel='iteration', ylabel='validation loss (cross-entropy, nats)', title='Validation loss')
    if ncols == 2:
        axes[0, 1].set(xlabel='tokens seen (millions)', ylabel='validation loss', title='Validation loss vs tokens')
    lows = [min(r['val_loss'] for r in run['evals']) for run in runs]
    highs = [run['evals'][min(1, len(run['evals']) - 1)]['val_loss'] for run in runs]
    for ax in axes[0]:
        ax.set_ylim(min(lows) - 0.05 * (max(highs) - min(lows) + 1e-9), max(highs) + 0.05)   # zoom past the first eval
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_expert_selection(runs: list[dict], colors: dict, path: str) -> bool:
    moe_runs = [r for r in runs if r['ffn_type'] != 'dense']
    if not moe_runs:
        return False
    n_layers = max(len(counts_of(r)[0]) for r in moe_runs)
    fig, axes = plt.subplots(len(moe_runs), n_layers, figsize=(3.2 * n_layers, 2.6 * len(moe_runs)), squeeze=False)
    for i, run in enumerate(moe_runs):
        counts, source = counts_of(run)
        layers = run['selection']['layers'] if run['selection'] else list(range(len(counts)))
        for j in range(n_layers):
            ax = axes[i, j]
            if j >= len(counts):
                ax.axis('off')
                continue
            shares = load_shares(counts)[j]
            ax.bar(range(len(shares)), shares, color=colors[run['dir']], width=0.85)
            ax.axhline(1 / len(shares), color='black', linestyle='--', linewidth=1, label='uniform')
            ax.set_title(f"{run['name']}, layer {layers[j]}" + ('' if source == 'final' else f'\n({source})'), fontsize=9)
            ax.set_xlabel('expert', fontsize=8)
            ax.tick_params(labelsize=7)
            if j == 0:
                ax.set_ylabel('share of token-slots', fontsize=8)
                ax.legend(fontsize=7, loc='upper right')
    fig.suptitle('Expert selection on a fixed validation batch at the end of training', fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def counts_of(run: dict) -> tuple[list[list[float]], str]:
    """The final expert-selection counts, or (run still in progress) the latest eval's training load."""
    if run['selection']:
        return run['selection']['counts'], 'final'
    last = [r for r in run['evals'] if r.get('expert_counts')][-1]
    return last['expert_counts'], f"in progress: training load before iter {last['iter']}"


def plot_maxvio(runs: list[dict], colors: dict, path: str) -> bool:
    moe_runs = [r for r in runs if any(e.get('expert_counts') for e in r['evals'])]
    if not moe_runs:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in moe_runs:
        pts = [(r['iter'], mean_maxvio(r['expert_counts'])) for r in run['evals'] if r.get('expert_counts')]
        ax.plot([p[0] for p in pts], [max(p[1], 1e-3) for p in pts], marker='.', color=colors[run['dir']], label=run['label'])
    ax.set_yscale('log')
    ax.set(xlabel='iteration', ylabel='MaxVio (max load / mean load - 1), mean over layers',
           title='Expert load imbalance during training (lower is more even)')
    ax.grid(alpha=0.3, which='both')
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# -----------------------------------------------------------------------------
# routing of single tokens


def routing(run_dir: str, text: str, layer: int, out: str, device: str, val_tokens: int) -> None:
    """routing.png: gate value of every expert for each token of text in one MoE layer;
    top_tokens.md: per expert, the tokens it receives most often on validation data."""
    import tiktoken
    from model import load_checkpoint
    from train import resolve_data_dir, windows
    model, ckpt = load_checkpoint(os.path.join(run_dir, 'ckpt.pt'), device)
    model.eval()
    ids = model.moe_layer_ids()
    if not ids:
        sys.exit(f"error: {run_dir} is a dense run; --routing needs a moe or deepseek_moe run")
    layer = ids[-1] if layer < 0 else layer
    if layer not in ids:
        sys.exit(f"error: block {layer} of {run_dir} is not a MoE layer; choose one of {ids}")
    ffn = model.transformer.h[layer].ffn
    captured = []
    hook = ffn.register_forward_hook(lambda m, inp, out_: captured.append(inp[0].detach()))

    def route(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k experts and gates of every token of idx (B, T) in the chosen layer."""
        captured.clear()
        with torch.no_grad():
            model(idx.to(device))
            x = captured[0]
            gates, chosen, _, _ = ffn.route(x.reshape(-1, x.shape[-1]))
        return gates.cpu(), chosen.cpu()

    enc = tiktoken.get_encoding('gpt2')
    tokens = enc.encode_ordinary(text)[:model.config.block_size]
    if not tokens:
        sys.exit("error: --text is empty")
    gates, chosen = route(torch.tensor([tokens]))
    grid = np.zeros((len(tokens), ffn.n_experts))
    for t in range(len(tokens)):
        grid[t, chosen[t].numpy()] = gates[t].numpy()
    os.makedirs(out, exist_ok=True)
    fig, ax = plt.subplots(figsize=(max(6, 0.22 * ffn.n_experts + 2), max(3, 0.28 * len(tokens) + 1.5)))
    im = ax.imshow(grid, aspect='auto', cmap='viridis', interpolation='nearest')
    ax.set_yticks(range(len(tokens)), [repr(enc.decode([t]))[1:-1] for t in tokens], fontsize=8)
    ax.set_xticks(range(ffn.n_experts), range(ffn.n_experts), fontsize=6)
    ax.set(xlabel='routed expert', title=f"{os.path.basename(os.path.normpath(run_dir))}: gate values in layer {layer} "
                                          f"(top-{ffn.top_k} per token)")
    fig.colorbar(im, ax=ax, label='gate value')
    fig.tight_layout()
    fig.savefig(os.path.join(out, 'routing.png'), dpi=120)
    plt.close(fig)
    print(f"wrote {os.path.join(out, 'routing.png')}")

    cfg = ckpt['config']
    val_path = os.path.join(resolve_data_dir(cfg['data_dir'], cfg['dataset']), 'val.bin')
    if not os.path.isfile(val_path):
        print(f"warning: {val_path} not found; top_tokens.md skipped")
        hook.remove()
        return
    data = np.memmap(val_path, dtype=np.uint16, mode='r')
    T = model.config.block_size
    n_windows = max(1, min(val_tokens, len(data) - 1) // T)
    per_expert = [Counter() for _ in range(ffn.n_experts)]
    for start in range(0, n_windows, 16):
        offsets = np.arange(start, min(start + 16, n_windows)) * T
        x, _ = windows(data, offsets, T)
        _, chosen = route(x)
        flat = x.reshape(-1).tolist()
        for tok, experts in zip(flat, chosen.tolist()):
            for e in experts:
                per_expert[e][tok] += 1
    hook.remove()
    lines = [f"# Most frequent tokens per expert, layer {layer} of {run_dir}",
             "", f"{n_windows * T:,} validation tokens; share = the expert's token-slots that were this token.", "",
             "| expert | token-slots | top tokens (share) |", "|---:|---:|---|"]
    for e, counter in enumerate(per_expert):
        total = sum(counter.values())
        top = ', '.join(f"`{enc.decode([t])!r}` {c / total:.0%}" for t, c in counter.most_common(8)) if total else '-'
        lines.append(f"| {e} | {total:,} | {top} |")
    with open(os.path.join(out, 'top_tokens.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print('\n'.join(lines))


# -----------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('runs', nargs='*', help="run directories (default: every out*/ here with a metrics.jsonl)")
    parser.add_argument('--out', default='compare_out', help="where the figures and summary.md go")
    parser.add_argument('--routing', metavar='RUN_DIR', help="show the routing of --text in one run instead")
    parser.add_argument('--text', default='Once upon a time, there was a little girl named Lily. She loved to play outside.')
    parser.add_argument('--layer', type=int, default=-1, help="block index of the MoE layer (default: the last)")
    parser.add_argument('--val-tokens', type=int, default=20_000, help="validation tokens for top_tokens.md")
    parser.add_argument('--device', default='cpu')
    args = parser.parse_args()
    if args.routing:
        try:
            routing(args.routing, args.text, args.layer, args.out, args.device, args.val_tokens)
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"error: {e}")
        return
    dirs = args.runs or sorted(d for d in glob.glob('out*/') if os.path.isfile(os.path.join(d, 'metrics.jsonl')))
    runs = [r for r in (load_run(d) for d in dirs) if r is not None]
    if not runs:
        sys.exit("error: no usable runs (looked in: " + (', '.join(dirs) or 'out*/') + "); train first, "
                 "e.g. python train.py config/deepseek_moe.py")
    os.makedirs(args.out, exist_ok=True)
    palette = plt.get_cmap('tab10').colors
    colors = {run['dir']: palette[i % len(palette)] for i, run in enumerate(runs)}   # one colour per run, everywhere
    plot_val_loss(runs, colors, os.path.join(args.out, 'val_loss.png'))
    written = ['val_loss.png']
    if plot_expert_selection(runs, colors, os.path.join(args.out, 'expert_selection.png')):
        written.append('expert_selection.png')
    if plot_maxvio(runs, colors, os.path.join(args.out, 'maxvio.png')):
        written.append('maxvio.png')
    table = markdown_table([summary_row(r) for r in runs])
    with open(os.path.join(args.out, 'summary.md'), 'w') as f:
        f.write(table + '\n')
    print(table)
    print(f"\nwrote {', '.join(os.path.join(args.out, w) for w in written + ['summary.md'])}")


if __name__ == '__main__':
    main()
