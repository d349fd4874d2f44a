"""
Where and how to run: the one place that decides device, dtype, torch.compile and the MoE dispatch, for
train.py, sample.py, compare.py and bench.py, and the GPU peak FLOP/s that MFU is measured against.

choose_runtime() is a pure function of what the machine offers (a Machine, read by probe_machine(), or
written by hand in the tests) and what was asked for; resolve_runtime() is choose_runtime on this machine.
"""

import re
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from moe import grouped_mm_runs

# Dense bf16 tensor-core peak FLOP/s per GPU (vendor datasheets, without sparsity). A key is the GPU's model
# name as whole words of torch.cuda.get_device_name() ('NVIDIA H100 80GB HBM3' -> H100, 'NVIDIA A100-SXM4-40GB'
# -> A100): 'L4' never matches an L40, nor 'A10' an A10G. Where several keys match, the one of most words wins
# ('H100 NVL' over 'H100'). A GPU not listed reports no MFU rather than a guess.
GPU_PEAK_FLOPS = {
    'B200': 2250e12,
    'H200': 989e12, 'H200 NVL': 835e12,                       # SXM; NVL (PCIe card)
    'H100': 989e12, 'H100 PCIe': 756e12, 'H100 NVL': 835e12,  # SXM ('H100 80GB HBM3'); PCIe; NVL
    'A100': 312e12,                                           # SXM and PCIe alike
    'L40S': 362e12, 'L40': 181e12, 'L4': 121e12,
    'A10': 125e12, 'A10G': 125e12,                            # A10G: AWS's GA102 with the A10's 72 SMs and clocks
    'RTX 4090': 165e12,                                       # bf16 with float32 accumulation (what matmuls use)
}


def peak_flops_of(name: str) -> float | None:
    """GPU_PEAK_FLOPS of a device name, matched by whole words; None for a GPU that is not listed."""
    words = re.split(r'[\s\-_]+', name.upper())
    best = None
    for key, flops in GPU_PEAK_FLOPS.items():
        key_words = key.upper().split()
        if all(w in words for w in key_words) and (best is None or len(key_words) > best[0]):
            best = (len(key_words), flops)
    return best[1] if best else None


def gpu_peak_flops(device: str | torch.device = 'cuda') -> float | None:
    """Peak bf16 FLOP/s of a CUDA device (GPU_PEAK_FLOPS); None on the CPU or for a GPU not listed."""
    if torch.device(device).type != 'cuda' or not torch.cuda.is_available():
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))


DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16, 'float64': torch.float64}


@dataclass(frozen=True)
class Machine:
    """What this machine and this PyTorch offer."""
    torch_version: str                                  # e.g. '2.13.0+cpu'
    cuda_gpus: tuple[tuple[str, tuple[int, int]], ...] = ()   # (name, compute capability) of each visible GPU
    cuda_built: bool = False                            # PyTorch built with CUDA
    mps_available: bool = False                         # Apple-silicon GPU usable by this PyTorch


@dataclass(frozen=True)
class Runtime:
    """The decisions and, in the *_why fields, their reasons (printed at start, logged in metrics.jsonl)."""
    device: str              # 'cuda', 'cuda:1', 'mps', 'cpu'
    device_type: str         # 'cuda' | 'mps' | 'cpu'
    dtype: str               # 'bfloat16' | 'float16' | 'float32' | 'float64'
    compile: bool
    moe_dispatch: str        # 'grouped' (F.grouped_mm) | 'loop' (loop over experts)
    grad_scaler: bool        # float16: scale the loss so that small gradients do not underflow
    tf32: bool               # CUDA float32 matmuls in TF32 (a float32 run only; see choose_runtime)
    where: str               # what the device is: 'NVIDIA T4, sm75', 'Apple GPU', 'no CUDA GPU, no MPS'
    dtype_why: str
    dispatch_why: str
    compile_why: str

    def summary(self, moe: bool = True) -> str:
        """One line, e.g. 'device cuda (NVIDIA T4, sm75): float16 + GradScaler (no native bfloat16 below sm80),
        MoE dispatch loop (grouped_mm needs bfloat16 on CUDA), compile on'. moe=False leaves the dispatch out."""
        return f"device {self.device} ({self.where}): " + ', '.join(
            [self.dtype_why] + ([self.dispatch_why] if moe else []) + [self.compile_why])

    def autocast(self):
        """The autocast context of the dtype; float32 and float64 run without (a float64 model is cast)."""
        if self.dtype in ('float32', 'float64'):
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=DTYPES[self.dtype])


def probe_machine() -> Machine:
    """This machine's GPUs and PyTorch, as choose_runtime needs them."""
    gpus = ()
    if torch.cuda.is_available():
        gpus = tuple((torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i))
                     for i in range(torch.cuda.device_count()))
    return Machine(torch_version=torch.__version__, cuda_gpus=gpus, cuda_built=torch.version.cuda is not None,
                   mps_available=torch.backends.mps.is_available())


def choose_runtime(machine: Machine, device: str = 'auto', dtype: str = 'auto', compile: bool | str = 'auto',
                   moe_dispatch: str = 'auto', expert_widths: tuple[int, ...] = ()) -> Runtime:
    """Device, dtype, compile and MoE dispatch for the request on this machine. 'auto' picks:
        device    the first CUDA GPU, else MPS, else the CPU
        dtype     CUDA: bfloat16 where native (compute capability >= 8.0), else float16 + GradScaler;
                  MPS and CPU: float32 (half-precision causal attention on MPS had correctness bugs)
        compile   CUDA from sm75 (Triton); off on MPS (a prototype) and on the CPU (minutes of compiling)
        dispatch  grouped wherever F.grouped_mm takes the dtype (CUDA in bfloat16, the CPU; see below), else
                  the loop over experts.
    expert_widths: n_embd and expert_hidden of a MoE model (grouped_mm needs 16-byte row strides).
    An impossible request raises ValueError with one line naming what this machine has and the fix."""
    available = ['cpu'] + (['mps'] if machine.mps_available else []) + [f'cuda:{i}' for i in range(len(machine.cuda_gpus))]
    # device
    asked = device
    if device == 'auto':
        device = 'cuda' if machine.cuda_gpus else 'mps' if machine.mps_available else 'cpu'
    device_type, _, index = device.partition(':') if isinstance(device, str) else (None, '', '')
    if device_type not in ('cuda', 'mps', 'cpu') or (index and (device_type != 'cuda' or not index.isdigit())):
        raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {device!r}")
    if device_type == 'cuda' and not machine.cuda_gpus:
        build = 'a CUDA build, but no GPU is visible' if machine.cuda_built else 'built without CUDA'
        raise ValueError(f"device {device!r} requested, but this PyTorch {machine.torch_version} is {build}; "
                         f"available: {', '.join(available)} (or --device=auto)")
    if device_type == 'cuda' and int(index or 0) >= len(machine.cuda_gpus):
        gpus = ', '.join(f'cuda:{i} {name}' for i, (name, _) in enumerate(machine.cuda_gpus))
        raise ValueError(f"device {device!r} requested, but this machine has {len(machine.cuda_gpus)} CUDA GPU(s): "
                         f"{gpus}; use one of those")
    if device_type == 'mps' and not machine.mps_available:
        raise ValueError(f"device 'mps' requested, but this PyTorch {machine.torch_version} has no usable MPS "
                         f"(Apple silicon, macOS 14+); available: {', '.join(available)}")
    cap = machine.cuda_gpus[int(index or 0)][1] if device_type == 'cuda' else None
    where = (f"{machine.cuda_gpus[int(index or 0)][0]}, sm{cap[0]}{cap[1]}" if cap
             else 'Apple GPU' if device_type == 'mps'
             else 'as requested' if asked != 'auto' and (machine.cuda_gpus or machine.mps_available)
             else 'no CUDA GPU' + ('' if machine.mps_available else ', no MPS'))

    # dtype
    if dtype != 'auto' and dtype not in DTYPES:
        raise ValueError(f"dtype must be auto|float32|bfloat16|float16|float64, got {dtype!r}")
    native_bf16 = cap is not None and cap >= (8, 0)
    if dtype == 'auto':
        dtype = ('bfloat16' if native_bf16 else 'float16') if cap else 'float32'
    if cap and dtype == 'bfloat16' and not native_bf16:
        raise ValueError(f"dtype bfloat16 requested, but {where} has no native bfloat16 (it needs sm80+); "
                         f"use --dtype=float16 (with loss scaling) or float32")
    if device_type == 'mps' and dtype == 'float64':
        raise ValueError("dtype float64 requested, but MPS has no float64; use float32")
    # TF32 (float32's range, a 10-bit mantissa) speeds up float32 matmuls from sm80, so a float32 run on CUDA takes
    # it, the router's matmul included. Under bfloat16/float16 autocast every other matmul is half precision already
    # and the only float32 one is the router's (moe.MoE.router_scores, float32 on purpose), so TF32 stays off there.
    tf32 = device_type == 'cuda' and dtype == 'float32'
    dtype_why = dtype + (' + GradScaler' if dtype == 'float16' else '') + (
        ' (no native bfloat16 below sm80)' if cap and dtype == 'float16' and not native_bf16 else '') + (
        ' (TF32 matmuls)' if tf32 else '')

    # compile
    if compile not in ('auto', True, False):
        raise ValueError(f"compile must be auto, True or False, got {compile!r}")
    if compile is True and cap and cap < (7, 0):
        raise ValueError(f"compile requested, but torch.compile (Triton) needs compute capability 7.0+ and "
                         f"{where} is older; use --compile=False")
    if compile == 'auto':
        compile = bool(cap and cap >= (7, 5))
        compile_why = (f"compile {'on' if compile else 'off'}" + ('' if compile else ' (Triton supports sm75+; '
                                                                      '--compile=True to try)') if cap
                       else 'compile off (a prototype on MPS)' if device_type == 'mps'
                       else 'compile off (on the CPU it costs minutes for little; --compile=True to try)')
    else:
        compile_why = f"compile {'on' if compile else 'off'}"

    # MoE dispatch: grouped_mm wherever it runs (moe.grouped_mm_runs), else the loop over experts. On CUDA, read from
    # torch 2.13's source (GroupedBlas.cpp, GroupedMMUtils.h), not timed on a GPU:
    #   sm90, sm100 (major 9 or 10), bfloat16: a CUTLASS grouped kernel that reads the offsets on the device.
    #   any other GPU (A100, RTX 30/40/50, L4, ...): _grouped_mm_fallback copies the offsets to the host, one sync
    #     per call (3 in a layer's forward, 6 in its backward), then runs one cuBLAS matmul per expert from C++.
    #   The loop runs the same matmuls with one sync per layer (counts.tolist()), but that sync breaks the compiled
    #   graph at every MoE layer (10-12 graphs for 2 layers, measured on the CPU), so below sm90 grouped is chosen
    #   too: one graph, and the same code path as on Hopper. float16 (T4, V100) and compiled float32 take the loop:
    #   grouped_mm's meta function demands bfloat16 under compile, and some releases before 2.13 refused
    #   float16 on CUDA ("Expected mat_a to be BFloat16 matrix").
    has_grouped_mm = tuple(int(v) for v in machine.torch_version.split('+')[0].split('.')[:2]) >= (2, 10)
    runs = has_grouped_mm and grouped_mm_runs(device_type, DTYPES[dtype], compile, expert_widths)
    if not has_grouped_mm:
        cannot = f"F.grouped_mm needs torch 2.10+, this is {machine.torch_version}"
    elif device_type == 'mps':
        cannot = 'grouped_mm has no MPS kernel'
    elif dtype == 'float64':
        cannot = 'grouped_mm takes no float64'
    elif grouped_mm_runs(device_type, DTYPES[dtype], compile):
        cannot = (f"grouped_mm needs n_embd and expert_hidden {expert_widths} to be multiples of "
                  f"{16 // DTYPES[dtype].itemsize} in {dtype}")
    elif device_type == 'cuda':
        cannot = 'grouped_mm needs bfloat16 on CUDA'
    else:
        cannot = 'compiled grouped_mm takes only bfloat16'
    if moe_dispatch not in ('auto', 'grouped', 'loop'):
        raise ValueError(f"moe_dispatch must be auto|grouped|loop, got {moe_dispatch!r}")
    if moe_dispatch == 'grouped' and not runs:
        raise ValueError(f"moe_dispatch='grouped' cannot run here: {cannot}; use --moe_dispatch=auto or loop")
    if moe_dispatch == 'auto':
        moe_dispatch = 'grouped' if runs else 'loop'
        dispatch_why = (f"MoE dispatch loop ({cannot})" if not runs
                        else "MoE dispatch grouped (F.grouped_mm)" if cap is None
                        else "MoE dispatch grouped (F.grouped_mm's CUTLASS kernel)" if cap[0] in (9, 10)
                        else "MoE dispatch grouped (F.grouped_mm: below sm90 a matmul per expert after a host sync "
                             "per call, pytorch#186620; one compiled graph all the same)")
    else:
        dispatch_why = f"MoE dispatch {moe_dispatch}"
    return Runtime(device=device, device_type=device_type, dtype=dtype, compile=compile, moe_dispatch=moe_dispatch,
                   grad_scaler=dtype == 'float16', tf32=tf32, where=where, dtype_why=dtype_why,
                   dispatch_why=dispatch_why, compile_why=compile_why)


def resolve_runtime(device: str = 'auto', dtype: str = 'auto', compile: bool | str = 'auto',
                    moe_dispatch: str = 'auto', expert_widths: tuple[int, ...] = ()) -> Runtime:
    """choose_runtime on this machine."""
    return choose_runtime(probe_machine(), device, dtype, compile, moe_dispatch, expert_widths)
