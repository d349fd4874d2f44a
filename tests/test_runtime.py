"""runtime.py: the device, dtype, compile and dispatch decisions for the machines our users have (by hand,
without the hardware), and the GPU peak FLOP/s that MFU divides by."""

import re

import pytest
import torch

from runtime import Machine, choose_runtime, peak_flops_of, probe_machine

TORCH = '2.13.0+cu130'
H100 = Machine(TORCH, (('NVIDIA H100 80GB HBM3', (9, 0)),), cuda_built=True)
A100 = Machine(TORCH, (('NVIDIA A100-SXM4-40GB', (8, 0)),), cuda_built=True)
RTX4090 = Machine(TORCH, (('NVIDIA GeForce RTX 4090', (8, 9)),), cuda_built=True)
T4 = Machine(TORCH, (('Tesla T4', (7, 5)),), cuda_built=True)
B200 = Machine(TORCH, (('NVIDIA B200', (10, 0)),), cuda_built=True)
RTX5090 = Machine(TORCH, (('NVIDIA GeForce RTX 5090', (12, 0)),), cuda_built=True)
V100 = Machine(TORCH, (('Tesla V100-SXM2-16GB', (7, 0)),), cuda_built=True)
MAC = Machine('2.13.0', mps_available=True)
CPU = Machine('2.13.0+cpu')


@pytest.mark.parametrize('machine, device, dtype, dispatch, compile, scaler', [
    (H100, 'cuda', 'bfloat16', 'grouped', True, False),   # grouped_mm's CUTLASS kernel: Hopper, bf16
    (B200, 'cuda', 'bfloat16', 'grouped', True, False),   # and Blackwell (sm100)
    (A100, 'cuda', 'bfloat16', 'grouped', True, False),   # below sm90 grouped_mm syncs and loops, in one graph
    (RTX4090, 'cuda', 'bfloat16', 'grouped', True, False),
    (RTX5090, 'cuda', 'bfloat16', 'grouped', True, False),  # sm120: the fallback too
    (T4, 'cuda', 'float16', 'loop', True, True),          # no native bf16: float16 with loss scaling
    (V100, 'cuda', 'float16', 'loop', False, True),       # Triton dropped Volta
    (MAC, 'mps', 'float32', 'loop', False, False),        # no MPS kernel for grouped_mm; compile is a prototype
    (CPU, 'cpu', 'float32', 'grouped', False, False),     # grouped_mm eager on the CPU, measured faster than the loop
])
def test_auto_decisions_per_machine(machine, device, dtype, dispatch, compile, scaler):
    rt = choose_runtime(machine)
    assert (rt.device, rt.device_type, rt.dtype, rt.moe_dispatch, rt.compile, rt.grad_scaler) == \
        (device, device, dtype, dispatch, compile, scaler)
    line = rt.summary()
    assert line.startswith(f'device {device} (') and f'MoE dispatch {dispatch}' in line
    assert 'MoE dispatch' not in rt.summary(moe=False)


def test_the_line_a_t4_user_sees():
    assert choose_runtime(T4).summary() == (
        "device cuda (Tesla T4, sm75): float16 + GradScaler (no native bfloat16 below sm80), "
        "MoE dispatch loop (grouped_mm needs bfloat16 on CUDA), compile on")



@pytest.mark.parametrize('machine, kernel', [(H100, 'CUTLASS kernel'), (B200, 'CUTLASS kernel'),
                                             (A100, 'host sync'), (RTX4090, 'host sync'), (RTX5090, 'host sync')])
def test_grouped_below_sm90_says_what_it_costs(machine, kernel):
    """Below sm90 the compiled loop broke the graph at every MoE layer; grouped_mm keeps one graph there, at a host
    sync per call inside the op (its fallback). The line says which of the two kernels a GPU gets."""
    rt = choose_runtime(machine)
    assert rt.moe_dispatch == 'grouped' and kernel in rt.dispatch_why, rt.dispatch_why
    assert choose_runtime(machine, moe_dispatch='loop').moe_dispatch == 'loop'


@pytest.mark.parametrize('machine, request_, chosen', [
    (H100, dict(dtype='float32'), dict(dtype='float32', moe_dispatch='loop')),     # the fast kernel is bf16 only
    (H100, dict(moe_dispatch='loop'), dict(moe_dispatch='loop')),
    (A100, dict(moe_dispatch='grouped'), dict(moe_dispatch='grouped')),          # forced: runs, slowly
    (CPU, dict(compile=True), dict(compile=True, moe_dispatch='loop')),          # compiled grouped_mm: bf16 only
    (CPU, dict(compile=True, dtype='bfloat16'), dict(compile=True, moe_dispatch='grouped')),
    (CPU, dict(dtype='float64'), dict(dtype='float64', moe_dispatch='loop')),
    (MAC, dict(dtype='bfloat16'), dict(dtype='bfloat16', moe_dispatch='loop')),
    (MAC, dict(device='cpu'), dict(device='cpu', moe_dispatch='grouped')),
    (Machine(TORCH, (('A', (8, 0)), ('B', (9, 0))), cuda_built=True), dict(device='cuda:1'),
     dict(device='cuda:1', moe_dispatch='grouped')),                           # the capability of the GPU asked for
    (Machine('2.9.1+cpu'), {}, dict(moe_dispatch='loop')),                       # F.grouped_mm is public from 2.10
])
def test_requests_are_honoured(machine, request_, chosen):
    rt = choose_runtime(machine, **request_)
    assert {k: getattr(rt, k) for k in chosen} == chosen


@pytest.mark.parametrize('machine, request_, message', [
    (CPU, dict(device='cuda'), "device 'cuda' requested, but this PyTorch 2.13.0+cpu is built without CUDA; available: cpu"),
    (Machine(TORCH, cuda_built=True), dict(device='cuda'), 'a CUDA build, but no GPU is visible'),
    (H100, dict(device='cuda:3'), "device 'cuda:3' requested, but this machine has 1 CUDA GPU(s): cuda:0 NVIDIA H100"),
    (CPU, dict(device='mps'), "device 'mps' requested, but this PyTorch 2.13.0+cpu has no usable MPS"),
    (CPU, dict(device='tpu'), "device must be auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
    (CPU, dict(device=True), 'device must be auto'),
    (T4, dict(dtype='bfloat16'), 'dtype bfloat16 requested, but Tesla T4, sm75 has no native bfloat16 (it needs sm80+)'),
    (MAC, dict(dtype='float64'), 'MPS has no float64'),
    (CPU, dict(dtype='fp16'), 'dtype must be auto|float32|bfloat16|float16|float64'),
    (CPU, dict(compile='yes'), 'compile must be auto, True or False'),
    (Machine(TORCH, (('old', (6, 1)),), cuda_built=True), dict(compile=True), 'needs compute capability 7.0+'),
    (T4, dict(moe_dispatch='grouped'), "moe_dispatch='grouped' cannot run here: grouped_mm needs bfloat16 on CUDA"),
    (MAC, dict(moe_dispatch='grouped'), 'grouped_mm has no MPS kernel'),
    (CPU, dict(moe_dispatch='grouped', dtype='float64'), 'grouped_mm takes no float64'),
    (CPU, dict(moe_dispatch='grouped', compile=True), 'compiled grouped_mm takes only bfloat16'),
    (Machine('2.9.1'), dict(moe_dispatch='grouped'), 'F.grouped_mm needs torch 2.10+'),
    (CPU, dict(moe_dispatch='fast'), 'moe_dispatch must be auto|grouped|loop'),
])
def test_impossible_requests_are_one_line(machine, request_, message):
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        choose_runtime(machine, **request_)
    assert '\n' not in str(e.value)


def test_grouped_mm_needs_16_byte_row_strides():
    # n_embd 60, expert_hidden 30: 120 and 240 bytes in fp32 (30 * 4 = 120 is not a multiple of 16)
    assert choose_runtime(CPU, expert_widths=(60, 30)).moe_dispatch == 'loop'
    assert choose_runtime(CPU, expert_widths=(60, 32)).moe_dispatch == 'grouped'          # 240 and 128 bytes
    assert choose_runtime(H100, expert_widths=(64, 36)).moe_dispatch == 'loop'            # 72 bytes in bf16
    with pytest.raises(ValueError, match=re.escape('expert_hidden (64, 36) to be multiples of 8 in bfloat16')):
        choose_runtime(H100, moe_dispatch='grouped', expert_widths=(64, 36))


def test_tf32_only_in_a_float32_cuda_run():
    """Under bf16/fp16 autocast the router's float32 matmul is the only float32 one, and TF32 would cut its mantissa
    to 10 bits: train.py turned TF32 on for every CUDA run. Now only where the run itself is float32."""
    assert not choose_runtime(H100).tf32 and not choose_runtime(A100).tf32 and not choose_runtime(T4).tf32
    assert choose_runtime(H100, dtype='float32').tf32
    assert 'float32 (TF32 matmuls)' in choose_runtime(A100, dtype='float32').summary()
    assert not choose_runtime(CPU).tf32 and not choose_runtime(MAC).tf32 and not choose_runtime(H100, device='cpu').tf32


def test_where_says_what_the_device_is():
    assert choose_runtime(H100, device='cpu').summary().startswith('device cpu (as requested): float32')
    assert choose_runtime(CPU).where == 'no CUDA GPU, no MPS'
    assert choose_runtime(MAC, device='cpu').where == 'as requested'


def test_probe_machine_reads_this_one():
    m = probe_machine()
    assert m.torch_version == torch.__version__ and len(m.cuda_gpus) == torch.cuda.device_count()
    assert choose_runtime(m).device_type in ('cuda', 'mps', 'cpu')


@pytest.mark.parametrize('name, flops', [
    ('NVIDIA H100 80GB HBM3', 989e12), ('NVIDIA H100 PCIe', 756e12), ('NVIDIA H100 NVL', 835e12),
    ('NVIDIA H200', 989e12), ('NVIDIA H200 NVL', 835e12), ('NVIDIA B200', 2250e12),
    ('NVIDIA A100-SXM4-40GB', 312e12), ('NVIDIA A100 80GB PCIe', 312e12),
    ('NVIDIA L40', 181e12), ('NVIDIA L40S', 362e12), ('NVIDIA L4', 121e12),     # no L40 gets the L4's figure
    ('NVIDIA A10', 125e12), ('NVIDIA A10G', 125e12), ('NVIDIA GeForce RTX 4090', 165e12),
    ('Tesla T4', None), ('NVIDIA GeForce RTX 3090', None), ('NVIDIA RTX A6000', None),   # not listed: no MFU
])
def test_peak_flops_match_whole_model_names(name, flops):
    assert peak_flops_of(name) == flops
