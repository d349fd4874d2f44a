"""
Expert parallelism's traffic: what an EP run sends per step, worked out and measured.

    python bench/all_to_all.py --plan            # the arithmetic: expert memory per GPU, bytes per step, EP against DDP
    python bench/all_to_all.py                   # measured: 2 gloo processes on the CPU, config/moe.py and deepseek_moe
    python bench/all_to_all.py --procs 2 --n_embd 128 --batch_size 16 --block_size 128 config/deepseek_moe.py
    torchrun --standalone --nproc_per_node=8 bench/all_to_all.py       # on 8 GPUs: NCCL, bfloat16 rows

The plan: with E routed experts per MoE layer of 3 * C * H parameters each (w_gate, w_up, w_down), L MoE layers,
T tokens per GPU per micro-step, top-k, W GPUs:
    expert memory per GPU     = L * E * 3CH / ep * 16 bytes     (fp32 weight and gradient, AdamW's two fp32 moments)
    all-to-all per micro-step = 4 * L * T * k * C * b * (ep-1)/ep  bytes sent by each GPU: each slot row (C values of
                                b bytes) to its expert's rank and back, and the gradients of both in the backward;
                                (ep-1)/ep of the rows go to other ranks when routing is even (dropless: an upper bound)
    DDP's expert all-reduce   = 2 * (R-1)/R * L * E * 3CH / ep * 4  bytes per GPU and step (a ring all-reduce of fp32
                                gradients over the R = W / ep ranks that hold the same experts; R = W under DDP)
The measurement times the exchange alone (moe.all_to_all_experts with identity experts on the slots of the layer's
own routing, forward + backward) and the whole EP layer, and counts the rows that really leave each rank. It
prints figures; compare timings only within one run on one machine.
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import config_of, ffn_step, first_ffn  # noqa: E402
from expert_parallel import keep_local_experts  # noqa: E402
from moe import all_to_all_experts, expert_capacity, expert_load  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def size(n_bytes: float) -> str:
    """Bytes for people, 3 significant digits: '679 MB', '10.5 TB'."""
    unit, scale = next((u, f) for u, f in (('TB', 1e12), ('GB', 1e9), ('MB', 1e6)) if n_bytes >= f or u == 'MB')
    return f"{n_bytes / scale:.3g} {unit}"


# -----------------------------------------------------------------------------
# the arithmetic


def expert_memory(n_moe_layers: int, n_experts: int, n_embd: int, expert_hidden: int, ep: int) -> float:
    """Bytes of routed-expert training state per GPU: fp32 weight + gradient + AdamW's two moments = 16 bytes each."""
    return n_moe_layers * n_experts * 3 * n_embd * expert_hidden / ep * 16


def all_to_all_bytes(n_moe_layers: int, tokens: int, top_k: int, n_embd: int, elem_bytes: int, ep: int) -> float:
    """Bytes each GPU sends in one micro-step's all-to-alls: 4 per MoE layer (dispatch, combine, and each one's
    gradient in the backward) of tokens * top_k rows of n_embd values, (ep-1)/ep of them to other ranks."""
    return 4 * n_moe_layers * tokens * top_k * n_embd * elem_bytes * (ep - 1) / ep


def expert_allreduce_bytes(n_moe_layers: int, n_experts: int, n_embd: int, expert_hidden: int, ep: int,
                           world: int) -> float:
    """Bytes each GPU sends to all-reduce the expert gradients (fp32) once per step, by a ring over the world / ep
    ranks holding the same experts: 2 (R-1)/R of the data. 0 when each expert lives on one rank (ep = world)."""
    replicas = world // ep
    return 2 * (replicas - 1) / replicas * n_moe_layers * n_experts * 3 * n_embd * expert_hidden / ep * 4


PLANS = [
    # name, MoE layers, routed experts, n_embd, expert_hidden, top_k, tokens per GPU per micro-step, bytes per value
    ("config/moe.py, train.py's size (6 x 384, 64 x 256 tokens)", 6, 8, 384, 768, 2, 64 * 256, 2),
    ("config/deepseek_moe.py, train.py's size", 6, 30, 384, 192, 6, 64 * 256, 2),
    ("config/tinystories_cpu.py + deepseek_moe.py (4 x 128, 16 x 128 tokens, fp32)", 4, 30, 128, 64, 6, 16 * 128, 4),
    # DeepSeek-V3 (technical report, sec. 4.2): 61 layers, the first 3 dense, hidden 7168, 256 routed experts of
    # width 2048 + 1 shared, top-8; one 4,096-token sequence per GPU and micro-step here; bf16 rows (V3 sends FP8)
    ("DeepSeek-V3-like (58 MoE layers, 256 x 2048, top-8, 7168 wide, 4,096 tokens)", 58, 256, 7168, 2048, 8, 4096, 2),
]


def plan() -> None:
    print("| model | GPUs W | DDP: expert state per GPU | DDP: expert all-reduce per step | EP = W: expert state "
          "per GPU | EP = W: all-to-all per micro-step |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, layers, experts, n_embd, hidden, top_k, tokens, elem in PLANS:
        for world in (2, 8, 64):
            if experts % world:
                continue
            print(f"| {name} | {world} | {size(expert_memory(layers, experts, n_embd, hidden, 1))} | "
                  f"{size(expert_allreduce_bytes(layers, experts, n_embd, hidden, 1, world))} | "
                  f"{size(expert_memory(layers, experts, n_embd, hidden, world))} | "
                  f"{size(all_to_all_bytes(layers, tokens, top_k, n_embd, elem, world))} |")


# -----------------------------------------------------------------------------
# the measurement


def measure(args) -> None:
    """In every process of the group: each config's first MoE layer cut to this rank's experts, timed."""
    rank, world = dist.get_rank(), dist.get_world_size()
    cuda = torch.cuda.is_available() and dist.get_backend() == 'nccl'
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else 'cpu'
    dtype = torch.bfloat16 if cuda else torch.float32

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()
    if rank == 0:
        print(f"{world} processes, {dist.get_backend()}, {device.split(':')[0]}, {dtype}, "
              f"{args.batch_size} x {args.block_size} tokens per rank")
        print("| config | slot rows per rank | rows leaving a rank | MB per layer fwd+bwd | exchange ms per layer "
              "| EP layer ms | MoE layers | MB per step | exchange ms per step |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for config_file in args.configs:
        cfg = config_of(os.path.join(REPO, config_file), f'--n_embd={args.n_embd}', '--n_layer=1', '--vocab_size=256',
                        f'--n_head={max(1, args.n_embd // 64)}', f'--block_size={args.block_size}')
        layer = first_ffn(cfg)
        keep_local_experts(_OneLayer(layer), dist.group.WORLD)
        layer.to(device)
        torch.manual_seed(rank)
        x = torch.randn(args.batch_size, args.block_size, cfg.n_embd, device=device, dtype=dtype, requires_grad=True)
        # the slots of this layer's own routing, sorted by expert, as dispatch builds them
        with torch.no_grad():
            xf = x.reshape(-1, cfg.n_embd).float()
            _, idx, _, _ = layer.route(xf)
            capacity = expert_capacity(xf.shape[0], cfg.n_experts, cfg.top_k, cfg.capacity_factor)
            order, counts, _ = layer._sort_slots(idx, expert_load(idx, cfg.n_experts), capacity)
        xs = x.reshape(-1, cfg.n_embd).index_select(0, order % xf.shape[0]).detach().requires_grad_()

        def exchange():
            ys = all_to_all_experts(xs, counts, lambda rows, n: rows, dist.group.WORLD)
            ys.backward(torch.ones_like(ys))
        autocast = torch.autocast('cuda', torch.bfloat16) if cuda else None
        times = {'exchange': [], 'layer': []}
        for name, fn in (('exchange', exchange), ('layer', ffn_step(layer, x, torch.randn_like(x), autocast))):
            for r in range(args.warmup + args.rounds):
                dist.barrier()
                t0 = now()
                fn()
                if r >= args.warmup:
                    times[name].append(now() - t0)
        # the rows that really leave this rank: all its kept slots but those for its own experts
        kept = counts.view(world, -1).sum(1)
        leaving = torch.tensor([float(kept.sum() - kept[rank])], device=device)
        dist.all_reduce(leaving)
        rows_out = leaving.item() / world                                 # the mean over ranks
        mb = 4 * rows_out * cfg.n_embd * x.element_size() / 1e6            # there and back, forward and backward
        ms = {k: statistics.median(v) * 1000 for k, v in times.items()}
        n_moe = args.moe_layers
        if rank == 0:
            print(f"| {config_file} | {len(order):,} | {rows_out:,.0f} | {mb:.2f} | {ms['exchange']:.1f} | "
                  f"{ms['layer']:.1f} | {n_moe} | {n_moe * mb:.1f} | {n_moe * ms['exchange']:.1f} |")


class _OneLayer(torch.nn.Module):
    """One MoE layer as keep_local_experts walks a model."""
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def moe_layers(self):
        return [self.layer]


def _spawned(rank: int, world: int, store: str, args) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group('gloo', init_method=f'file://{store}', rank=rank, world_size=world)
    measure(args)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('configs', nargs='*', default=['config/moe.py', 'config/deepseek_moe.py'])
    parser.add_argument('--plan', action='store_true', help="print the arithmetic only")
    parser.add_argument('--procs', type=int, default=2, help="gloo processes when not under torchrun")
    parser.add_argument('--n_embd', type=int, default=128)
    parser.add_argument('--batch_size', type=int, default=16)
    parser.add_argument('--block_size', type=int, default=128)
    parser.add_argument('--moe_layers', type=int, default=4, help="MoE layers of the model a step is counted for")
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--rounds', type=int, default=10)
    parser.add_argument('--threads', type=int, default=1)
    args = parser.parse_args()
    if args.plan:
        plan()
    elif 'RANK' in os.environ:                         # torchrun: NCCL on GPUs, gloo otherwise
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ['LOCAL_RANK']))
        dist.init_process_group('nccl' if cuda else 'gloo')
        measure(args)
        dist.barrier()
        dist.destroy_process_group()
    else:
        import tempfile
        import torch.multiprocessing as mp
        with tempfile.TemporaryDirectory() as d:
            mp.spawn(_spawned, args=(args.procs, os.path.join(d, 'store'), args), nprocs=args.procs)


if __name__ == '__main__':
    main()
