"""
Benchmark: what does an MoE step cost over a dense model with the same ACTIVE FFN width?

    python bench.py                          # CPU: n_layer 2, n_embd 256, 8 x 256 tokens
    python bench.py --device cuda            # bf16 autocast + torch.compile, sizes 6x384 and 12x768
    python bench.py --sizes 2x256 4x512 --batch_size 8 --block_size 256 --rounds 15
    python bench.py --device cuda --sizes 6x384 --models dense E=8 E=64 E=256   # only the expert-count slope

On a Linux CPU, set MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 first: otherwise glibc
returns the ~400 MB of logits to the system every step, and page faults take half the step (bench/RESULTS.md).

For each size (n_layer x n_embd) it builds, exactly as train.py would from the config files (the configurator,
then GPT(...) with its init_weights), at that size:
    dense         config/dense.py: SwiGLU FFN of width 4 * n_embd
    moe           config/moe.py: 8 experts, top-2, each 2 * n_embd wide, capacity 1.25, Switch loss, z-loss
    deepseek_moe  config/deepseek_moe.py: 2 shared + 30 routed experts of n_embd / 2, top-6, sigmoid, bias, seq loss
    E=8, E=64, E=256   the scaling family: config/deepseek_moe.py with 8, 64, 256 routed experts (top-2, -8, -16) of
                  width 4 * n_embd / top_k and no shared experts, nothing else changed
and times full training steps (forward, backward, AdamW) after a warm-up, interleaving the models round
by round (in an order rotated every round), so that a slow moment of the machine hits all of them; each
MoE's cost is the median over rounds of its step time divided by dense's in the same round. Then the same for one FFN layer alone (forward +
backward on B*T tokens), and the dispatch share: the MoE layer's time minus its expert matmuls alone
(router, sort, gather, weighting, scatter-add, balancing statistics), as a share of the full step.
Last, the slope of log(layer cost) against log(expert count) over the scaling family: 0 would mean
more experts are free, 1 that the cost grows in proportion to their number.
Ratios are measured in one run on one machine; absolute times move with the machine, ratios much less.
"""

import argparse
import contextlib
import dataclasses
import math
import statistics
import time

import torch

import os

from configurator import configure
from model import GPT, GPTConfig
from moe import expert_capacity, expert_load, grouped_mm_runs
from runtime import gpu_peak_flops, resolve_runtime


# The scaling family: (routed experts, top_k). Expert width 4 * n_embd / top_k keeps the active width fixed.
SCALING = [(8, 2), (64, 8), (256, 16)]
MODELS = ['dense', 'moe', 'deepseek_moe'] + [f'E={e}' for e, _ in SCALING]     # every row bench.py can time


REPO = os.path.dirname(os.path.abspath(__file__))


def config_of(*argv: str) -> GPTConfig:
    """The model that python train.py <argv> builds: config files and --key=value through the configurator."""
    # train.py is where every setting's default lives (nanoGPT's way: a reader changes a default where the loop uses
    # it); importing it runs only those assignments and the helper definitions, its loop sits under __main__
    from train import DEFAULTS, MODEL_KEYS
    settings = configure(DEFAULTS, list(argv))
    return GPTConfig(**{k: settings[k] for k in MODEL_KEYS})


def ffn_step(ffn, x: torch.Tensor, gy: torch.Tensor, autocast=None):
    """One forward + backward of an FFN layer on x with upstream gradient gy, the balancing losses' backward
    included: what bench.py, bench/profile_layer.py and bench/ab_moe.py time."""
    def step():
        with autocast or contextlib.nullcontext():
            y, aux = ffn(x)
        outs, grads = [y], [gy.to(y.dtype)]
        if aux and aux['aux_loss'].requires_grad:
            outs, grads = outs + [aux['aux_loss']], grads + [torch.ones_like(aux['aux_loss'])]
        torch.autograd.backward(outs, grads)
    return step


def model_configs(n_layer: int, n_embd: int, vocab_size: int, block_size: int, scaling: bool) -> dict[str, GPTConfig]:
    """The benchmarked models (MODELS), built from the config files through the configurator as train.py builds
    them, at this size (heads of 64); all have the active FFN width 4 * n_embd. The scaling rows are
    config/deepseek_moe.py with more, narrower routed experts: top_k * expert_hidden = 4 * n_embd, no shared
    experts."""
    size = [f'--n_layer={n_layer}', f'--n_embd={n_embd}', f'--n_head={max(1, n_embd // 64)}',
            f'--vocab_size={vocab_size}', f'--block_size={block_size}']

    def build(name: str, *extra: str) -> GPTConfig:
        return config_of(os.path.join(REPO, 'config', f'{name}.py'), *size, *extra)
    configs = {name: build(name) for name in ('dense', 'moe', 'deepseek_moe')}
    if scaling:
        for n_experts, top_k in SCALING:
            configs[f'E={n_experts}'] = build('deepseek_moe', f'--n_experts={n_experts}', f'--top_k={top_k}',
                                              f'--expert_hidden={4 * n_embd // top_k}', '--n_shared_experts=0')
    return configs


def scaling_slope(points: list[tuple[int, float]]) -> float:
    """Least-squares slope b of log(cost) = a + b * log(experts) over (experts, cost) points:
    cost grows as experts^b."""
    xs = [math.log(e) for e, _ in points]
    ys = [math.log(c) for _, c in points]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def compiled(fn, backend: str = 'inductor'):
    """torch.compile as bench.py needs it. It compiles some 20 models and layers in one process, and dynamo
    files compiled graphs under the function's code (GPT.forward, MoE.forward), shared by every instance:
    past its recompile limit of 8 a further model would silently run EAGER, making its timing meaningless.
    So the limit is raised and hitting it is an error; and shapes are static, so that each model gets its
    own graph for its own sizes rather than a shape-generic one after the first size change."""
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    return torch.compile(fn, dynamic=False, backend=backend)


def timer(device: str):
    """Returns now(): wall-clock seconds after the device has finished all queued work."""
    def now() -> float:
        if device == 'cuda':
            torch.cuda.synchronize()
        return time.perf_counter()
    return now


def round_order(names: list, r: int) -> list:
    """The order of round r: the list rotated by r, so that no model always runs first (after the largest
    one, say) and a position effect cannot pass for a speed difference."""
    r %= len(names)
    return names[r:] + names[:r]


def interleaved_times(fns: dict, warmup: int, rounds: int, device: str) -> dict[str, list[float]]:
    """Run every fn `warmup` times, then `rounds` rounds of one call each, in a rotating order. Seconds per call."""
    now = timer(device)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for r in range(rounds):
        for name in round_order(list(fns), r):
            t0 = now()
            fns[name]()
            times[name].append(now() - t0)
    return times


def median_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a_r / b_r (per-pair ratios cancel slow phases common to both)."""
    return statistics.median(x / y for x, y in zip(a, b))


def train_step_fn(cfg: GPTConfig, args, device: str):
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    opt = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), device)
    step_model = compiled(model) if args.compile else model
    # inputs and targets apart, as train.py's batches: then its compiled graph is this one, and inductor's cache
    # filled here serves train.py's compile of the same model (bench/gpu_check.sh runs bench.py first)
    x = torch.randint(0, cfg.vocab_size, (args.batch_size, cfg.block_size), device=device)
    y = torch.randint(0, cfg.vocab_size, (args.batch_size, cfg.block_size), device=device)   # not a view of x
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == 'bfloat16')

    def step():
        with autocast:
            _, loss, aux = step_model(x, y, return_aux=True)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_moe_biases(aux['expert_counts'])
    return model, step


def first_ffn(cfg: GPTConfig) -> torch.nn.Module:
    """The FFN of the first block of GPT(cfg), initialised as in training (GPT.init_weights), on the CPU."""
    torch.manual_seed(0)
    return GPT(cfg).transformer.h[0].ffn


def ffn_layer_fns(cfg: GPTConfig, args, device: str):
    """One FFN alone, forward + backward on B*T tokens: the FFN of the first block of GPT(cfg), initialised as in
    training; for MoE also its expert matmuls alone (with the gate multiply they include)."""
    n = args.batch_size * cfg.block_size
    layer = first_ffn(cfg).to(device)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, cfg.block_size, cfg.n_embd, device=device, requires_grad=True)
    gy = torch.randn(args.batch_size, cfg.block_size, cfg.n_embd, device=device)   # upstream gradient
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == 'bfloat16')
    fwd_bwd = ffn_step(compiled(layer) if args.compile else layer, x, gy, autocast)
    if cfg.ffn_type == 'dense':
        return {'layer': fwd_bwd}
    shared = layer.shared_experts
    # the same expert work on tokens already sorted by expert: what a perfect dispatch would cost
    with torch.no_grad(), autocast:
        xf = x.detach().view(n, cfg.n_embd)
        gates, idx, _, _ = layer.route(xf)
        cap = expert_capacity(n, cfg.n_experts, cfg.top_k, cfg.capacity_factor)
        order, counts, keep = layer._sort_slots(idx, expert_load(idx, cfg.n_experts), cap)
    dtype = torch.bfloat16 if args.dtype == 'bfloat16' else torch.float32
    xs = xf[order % n].to(dtype).clone().requires_grad_()
    gate = gates.t().reshape(-1)[order].to(dtype).clone().requires_grad_()
    xsh = xf.clone().requires_grad_()
    # the expert matmuls of the path the layer itself takes (see MoE.run_experts)
    grouped = cfg.moe_dispatch != 'loop' and grouped_mm_runs(device, dtype, args.compile, (cfg.n_embd, cfg.expert_hidden))
    experts = ((lambda: layer._experts_grouped(xs, gate, counts, keep)) if grouped
               else (lambda: layer._experts_loop(xs, gate, counts, keep)))
    experts = compiled(experts) if args.compile else experts

    gys = torch.randn(xs.shape, device=device, dtype=dtype)
    gy_flat = gy.view(n, cfg.n_embd)

    def experts_only():
        with autocast:
            outs = [experts()]
            if shared is not None:
                outs.append(shared(xsh))
        torch.autograd.backward(outs, [gys.to(outs[0].dtype)] + [gy_flat.to(o.dtype) for o in outs[1:]])
    return {'layer': fwd_bwd, 'experts': experts_only}


def check_no_host_sync(cfg: GPTConfig, args) -> str:
    """CUDA only: run the MoE forward with sync debug mode 'error' (raises on .item(), .tolist(), ...)."""
    layer = first_ffn(cfg).cuda()
    x = torch.randn(args.batch_size, cfg.block_size, cfg.n_embd, device='cuda')
    with torch.autocast('cuda', dtype=torch.bfloat16):
        layer(x)                                  # first call: allocations, lazy init
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode('error')
        try:
            layer(x)
            result = 'none'
        except RuntimeError as e:
            result = f'SYNC: {str(e).splitlines()[0]}'
        finally:
            torch.cuda.set_sync_debug_mode('default')
    return result


def with_runtime_dispatch(cfg: GPTConfig, args, device: str) -> GPTConfig:
    """cfg with the MoE dispatch train.py would choose on this machine for this dtype and compile (runtime.py):
    the loop on a T4 or V100 (float16, where compiled grouped_mm takes only bfloat16), say."""
    if cfg.ffn_type == 'dense':
        return cfg
    rt = resolve_runtime(device, args.dtype, args.compile, 'auto', (cfg.n_embd, cfg.expert_hidden))
    return dataclasses.replace(cfg, moe_dispatch=rt.moe_dispatch)


def bench_size(n_layer: int, n_embd: int, args, device: str) -> None:
    configs = {name: with_runtime_dispatch(cfg, args, device)
               for name, cfg in model_configs(n_layer, n_embd, args.vocab_size, args.block_size, True).items()
               if name in args.models}
    tokens = args.batch_size * args.block_size
    peak = gpu_peak_flops(device) if device == 'cuda' else None
    print(f"\n## n_layer={n_layer} n_embd={n_embd}, {args.batch_size}x{args.block_size} tokens, "
          f"vocab {args.vocab_size}, {args.dtype}, compile={args.compile}, device={device_name(device)}")

    # 1. full training steps
    steps, models = {}, {}
    now = timer(device)
    first_s = {}
    for name, cfg in configs.items():
        models[name], steps[name] = train_step_fn(cfg, args, device)
        t0 = now()
        steps[name]()                                   # the first step: compiles (forward and backward), warms up
        first_s[name] = now() - t0
    times = interleaved_times(steps, max(0, args.warmup - 1), args.rounds, device)
    print("\nfirst step (" + ("compile included; a later model reuses the kernels of earlier ones" if args.compile
                             else "no compile") + "), s: "
          + ", ".join(f"{name} {t:.1f}" for name, t in first_s.items()))
    print("\n| model | routed experts | shared | top-k | total params | active params | ms/step | tokens/s | MFU | step / dense |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    step_ratio = {}
    for name, cfg in configs.items():
        ms = 1000 * statistics.median(times[name])
        counts = models[name].param_counts()
        mfu = models[name].estimate_mfu(args.batch_size, ms / 1000, peak) if peak else None
        step_ratio[name] = median_ratio(times[name], times['dense'])
        moe = cfg.ffn_type != 'dense'
        print(f"| {name} | {cfg.n_experts if moe else '-'} | {cfg.n_shared_experts if moe else '-'} | "
              f"{cfg.top_k if moe else '-'} | {counts['total'] / 1e6:.2f}M | {counts['active'] / 1e6:.2f}M | "
              f"{ms:.1f} | {tokens / ms * 1000:,.0f} | {f'{100 * mfu:.1f}%' if mfu else '-'} | {step_ratio[name]:.3f}x |")
    del models, steps

    # 2. one FFN layer alone, and the dispatch share
    fns = {}
    for name, cfg in configs.items():
        for part, fn in ffn_layer_fns(cfg, args, device).items():
            fns[(name, part)] = fn
    ltimes = interleaved_times(fns, args.warmup, args.rounds, device)
    dense_layer = ltimes[('dense', 'layer')]
    print("\n| FFN layer alone (fwd+bwd) | ms | layer / dense | FFN layers' share of step | dispatch ms | "
          "dispatch share of layer | dispatch share of step |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    layer_ratio = {}
    for name, cfg in configs.items():
        layer_ms = 1000 * statistics.median(ltimes[(name, 'layer')])
        layer_ratio[name] = median_ratio(ltimes[(name, 'layer')], dense_layer)
        step_ms = 1000 * statistics.median(times[name])
        ffn_share = n_layer * layer_ms / step_ms        # the step's FFN layers, each timed alone, over the whole step
        if cfg.ffn_type == 'dense':
            print(f"| {name} | {layer_ms:.2f} | 1.000x | {ffn_share:.0%} | - | - | - |")
            continue
        dispatch = [a - b for a, b in zip(ltimes[(name, 'layer')], ltimes[(name, 'experts')])]
        dispatch_ms = 1000 * statistics.median(dispatch)
        n_moe = n_layer - cfg.n_dense_layers
        print(f"| {name} | {layer_ms:.2f} | {layer_ratio[name]:.3f}x | {ffn_share:.0%} | {dispatch_ms:.2f} | "
              f"{dispatch_ms / layer_ms:.0%} | {n_moe * dispatch_ms / step_ms:.0%} |")
    family = [(e, f'E={e}') for e, _ in SCALING if f'E={e}' in configs]
    if len(family) >= 2:
        print(f"\nscaling from {family[0][0]} to {family[-1][0]} routed experts at equal active width: FFN layer cost "
              f"grows as experts^{scaling_slope([(e, layer_ratio[n]) for e, n in family]):.2f}, full step as "
              f"experts^{scaling_slope([(e, step_ratio[n]) for e, n in family]):.2f}")
    if device == 'cuda':
        for name in ('moe', 'deepseek_moe'):
            if name in configs:
                print(f"host synchronisations in the {name} forward: {check_no_host_sync(configs[name], args)}")


def device_name(device: str) -> str:
    if device == 'cuda':
        return torch.cuda.get_device_name()
    return f'cpu ({torch.get_num_threads()} threads)'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--sizes', nargs='+', default=None, help="n_layer x n_embd, e.g. 2x256 6x384")
    parser.add_argument('--batch_size', type=int, default=None, help="default 8 on CPU, 64 on CUDA")
    parser.add_argument('--block_size', type=int, default=256)
    parser.add_argument('--vocab_size', type=int, default=50304)
    parser.add_argument('--warmup', type=int, default=None, help="default 3 on CPU, 10 on CUDA")
    parser.add_argument('--rounds', type=int, default=None, help="default 10 on CPU, 30 on CUDA")
    parser.add_argument('--dtype', choices=['float32', 'bfloat16'], default=None,
                        help="default bfloat16 (autocast) on CUDA, float32 on CPU")
    parser.add_argument('--compile', type=lambda s: s.lower() in ('1', 'true', 'yes'), default=None,
                        help="torch.compile the models; default True on CUDA, False on CPU")
    parser.add_argument('--threads', type=int, default=0, help="CPU threads (0 = torch's default)")
    parser.add_argument('--no_scaling', action='store_true', help="skip the E=8, E=64 and E=256 rows")
    parser.add_argument('--models', nargs='+', choices=MODELS, default=None,
                        help="time only these rows (dense always: the others are measured against it)")
    args = parser.parse_args()
    cuda = args.device == 'cuda'
    if cuda and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA GPU is visible; use --device cpu")
    args.sizes = args.sizes or (['6x384', '12x768'] if cuda else ['2x256'])
    args.batch_size = args.batch_size or (64 if cuda else 8)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 3)
    args.rounds = args.rounds or (30 if cuda else 10)
    args.dtype = args.dtype or ('bfloat16' if cuda else 'float32')
    args.compile = cuda if args.compile is None else args.compile
    args.models = ['dense'] + [m for m in (args.models or MODELS) if m != 'dense'
                               and not (args.no_scaling and m.startswith('E='))]
    if args.threads:
        torch.set_num_threads(args.threads)
    # TF32 as train.py decides it (runtime.Runtime.tf32: a float32 run on CUDA only, never the router of a bf16 run):
    # the timed steps are then train.py's, and so are the compiled graphs, whose key in inductor's cache holds this
    # setting (bench/gpu_check.sh counts on train.py finding bench.py's graphs there)
    if resolve_runtime(args.device, args.dtype, args.compile).tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    print(f"torch {torch.__version__}, {device_name(args.device)}")
    sizes = []
    for size in args.sizes:               # all checked before the first (long) one runs
        try:
            n_layer, n_embd = (int(v) for v in size.lower().split('x'))
        except ValueError:
            raise SystemExit(f"error: --sizes takes n_layer x n_embd like 6x384, got {size!r}") from None
        if n_layer < 1 or n_embd < 64 or n_embd % 64:
            raise SystemExit(f"error: --sizes {size}: n_layer must be >= 1 and n_embd a multiple of 64 "
                             f"(heads of 64; the finest experts are n_embd / 4 wide)")
        sizes.append((n_layer, n_embd))
    for n_layer, n_embd in sizes:
        bench_size(n_layer, n_embd, args, args.device)


if __name__ == '__main__':
    main()
