"""The path train.py takes on a GPU, which no other test runs: bf16 autocast into F.grouped_mm, no host sync in the
MoE layer, one inductor graph per run, fused AdamW, MFU. Skipped without CUDA, so CI on the CPU is unchanged. On a
GPU the file takes about a minute, most of it compiling; bench/gpu_check.sh runs it first.

TEST_CUDA_DEVICE=cpu rehearses the same tests on the CPU (bench/gpu_check.sh's dry run): bf16 autocast, grouped_mm
and inductor there too, with the checks only CUDA can make (host syncs, fused AdamW, MFU) skipped. It catches a
broken test or path before GPU time is spent on it; it says nothing about the CUDA kernels themselves."""

import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, random_token_data, subprocess_env
from test_model import KINDS, tiny
from test_moe import make_layer, naive_moe

DEVICE = os.environ.get('TEST_CUDA_DEVICE', 'cuda')
if DEVICE not in ('cuda', 'cpu'):
    raise ValueError(f"TEST_CUDA_DEVICE must be cuda or cpu (the dry run's rehearsal), got {DEVICE!r}")
pytestmark = pytest.mark.skipif(DEVICE == 'cuda' and not torch.cuda.is_available(),
                                reason='needs a CUDA GPU (TEST_CUDA_DEVICE=cpu rehearses it on the CPU)')
cuda_only = pytest.mark.skipif(DEVICE != 'cuda', reason='CUDA only (the CPU rehearsal skips it)')


def capability() -> tuple[int, int]:
    return torch.cuda.get_device_capability() if DEVICE == 'cuda' and torch.cuda.is_available() else (0, 0)


def ran_grouped_mm(fn) -> bool:
    """Whether fn() called aten::_grouped_mm (the profiler sees every aten op, also those a compiled graph calls):
    the layer falls back to its loop without a word where grouped_mm does not take the dtype or device."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return any(event.key == 'aten::_grouped_mm' for event in prof.key_averages())


# F.grouped_mm on CUDA takes bfloat16 from sm80; its CUTLASS kernel (no host sync) is sm90/sm100 only, and below
# that it copies the offsets to the host once per call (pytorch#186620). On the CPU it takes bfloat16 too (eager
# and compiled).
needs_grouped_mm = pytest.mark.skipif(DEVICE == 'cuda' and torch.cuda.is_available() and capability() < (8, 0),
                                      reason='grouped_mm on CUDA needs sm80+ (bfloat16)')
needs_fast_grouped_mm = pytest.mark.skipif(DEVICE == 'cuda' and torch.cuda.is_available()
                                           and capability()[0] not in (9, 10),
                                           reason="grouped_mm syncs with the host below sm90 (pytorch#186620)")

# The routing of the two config files at a small width. moe: config/moe.py (8 experts, top-2, capacity 1.25,
# Switch loss, z-loss); deepseek_moe: config/deepseek_moe.py (2 shared + 30 routed of n_embd/2, top-6, sigmoid,
# aux-loss-free bias, sequence-wise loss).
N_EMBD = 64
LAYERS = {
    'moe': dict(ffn_type='moe', n_experts=8, top_k=2, hidden=2 * N_EMBD, capacity_factor=1.25,
                balance_loss_coef=0.01, z_loss_coef=0.001),
    'deepseek_moe': dict(ffn_type='deepseek_moe', n_experts=30, top_k=6, hidden=N_EMBD // 2, shared=2,
                         score_func='sigmoid', bias_update_speed=0.001, seq_aux_coef=0.0001),
}
BF16 = 2e-2          # bf16 against the float32 reference: a few roundings of 2^-9 on the way, relative to the scale
BF16_PATHS = 1e-2    # grouped against loop, both bf16: the same roundings, only the matmul kernels differ
MARGIN = 1e-5        # routing decisions at least this far from a tie (float32 noise is ~1e-7 here)


def routing_margin(layer, x: torch.Tensor) -> float:
    """The smallest gap, over tokens, between the k-th and (k+1)-th biased score: how far the top-k choice is
    from a tie that float32 noise (another kernel, another summation order) could flip."""
    _, _, scores, _ = layer.route(x.reshape(-1, x.shape[-1]))
    top = (scores + layer.expert_bias).topk(layer.top_k + 1, dim=-1).values
    return (top[:, -2] - top[:, -1]).min().item()


def layer_and_input(kind: str, device: str = DEVICE, idle_expert: bool = False):
    """A MoE layer of kind LAYERS[kind] (grouped dispatch, float32 weights) on device and an input (4, 32, C)
    whose routing has a clear margin. Weights are N(0, 1/fan_in) rather than make_layer's N(0, 0.5): with those, sigmoid scores
    sit at exactly 1.0 in float32 and top-k tests tie-breaking, not dispatch. deepseek_moe gets a bias that
    changes choices; idle_expert=True biases expert 0 out of every top-k (its group is empty)."""
    for seed in range(20):
        layer = make_layer(n_embd=N_EMBD, dispatch='grouped', seed=seed, **LAYERS[kind]).to(device)
        with torch.no_grad():
            for p in layer.parameters():
                p.normal_(0, p.shape[-1] ** -0.5)
            if idle_expert:
                layer.expert_bias[0] = -10.0          # scores are in [0, 1]: never in the top-k
            elif layer.deepseek:
                layer.expert_bias.copy_(torch.linspace(-0.3, 0.3, layer.n_experts))
        x = torch.randn(4, 32, N_EMBD, device=device)
        if routing_margin(layer, x) > MARGIN:
            return layer, x
    raise AssertionError(f'no seed in 20 gave routing a margin of {MARGIN}')


def loop_copy(layer, kind: str):
    """The same layer (weights, bias) built with moe_dispatch='loop'."""
    loop = make_layer(n_embd=N_EMBD, dispatch='loop', **LAYERS[kind]).to(layer.expert_bias.device)
    loop.load_state_dict(layer.state_dict())
    return loop


def forward_backward(layer, x: torch.Tensor, grad_out: torch.Tensor, bf16: bool, naive: bool = False):
    """y, the gradients of x and of every parameter (zeros where unused), and aux (None for naive). naive:
    test_moe's per-token reference, on a CPU copy of the layer (it builds its rows on the CPU)."""
    if naive:
        layer, x, grad_out = copy.deepcopy(layer).cpu(), x.cpu(), grad_out.cpu()
    x = x.clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        y, aux = (naive_moe(layer, x), None) if naive else layer(x)
    params = list(layer.parameters())
    grads = torch.autograd.grad(y, [x, *params], grad_out.to(y.dtype), allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, [x, *params])]
    return y, grads, aux


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    """|actual - expected| <= tol * (max |expected| + |expected|): bf16 errors scale with the tensor's
    magnitude, and a tensor's small entries carry the absolute error of its large ones."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), atol=tol * scale, rtol=tol,
                               msg=lambda m: f'{what}: {m}')


def names(layer) -> list[str]:
    return ['x'] + [name for name, _ in layer.named_parameters()]


# -----------------------------------------------------------------------------
# the MoE layer in bf16 on the grouped_mm path


@needs_grouped_mm
@pytest.mark.parametrize('kind', LAYERS)
def test_grouped_bf16_matches_the_loop_and_the_naive_reference(kind):
    layer, x = layer_and_input(kind)
    loop = loop_copy(layer, kind)
    grad_out = torch.randn_like(x)
    y, grads, aux = forward_backward(layer, x, grad_out, bf16=True)
    y_loop, grads_loop, _ = forward_backward(loop, x, grad_out, bf16=True)
    y_ref, grads_ref, _ = forward_backward(layer, x, grad_out, bf16=False, naive=True)
    # the grouped layer really took grouped_mm (it would fall back to the loop silently), the loop layer never
    assert ran_grouped_mm(lambda: forward_backward(layer, x, grad_out, bf16=True))
    assert not ran_grouped_mm(lambda: forward_backward(loop, x, grad_out, bf16=True))
    if kind == 'moe':
        assert aux['dropped_frac'].item() > 0                       # capacity 1.25 really drops here
    assert_close_to_scale(y, y_loop, BF16_PATHS, 'y, grouped vs loop')
    assert_close_to_scale(y, y_ref, BF16, 'y, grouped bf16 vs naive float32')
    assert_close_to_scale(y_loop, y_ref, BF16, 'y, loop bf16 vs naive float32')
    for name, g, g_loop, g_ref in zip(names(layer), grads, grads_loop, grads_ref):
        assert torch.isfinite(g).all(), name
        assert_close_to_scale(g, g_loop, BF16_PATHS, f'grad {name}, grouped vs loop')
        assert_close_to_scale(g, g_ref, BF16, f'grad {name}, grouped bf16 vs naive float32')


@pytest.fixture
def poisoned_memory():
    """Every tensor allocated without being written (torch.empty, rows a kernel skips) is NaN. warn_only: some
    CUDA ops used here (index_add_) have no deterministic kernel, and only the filling is wanted."""
    import torch.utils.deterministic
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.utils.deterministic.fill_uninitialized_memory = before[2]


@needs_grouped_mm
@pytest.mark.parametrize('kind', LAYERS)
@pytest.mark.filterwarnings('ignore::UserWarning')
def test_an_idle_expert_and_dropped_rows_leave_no_garbage(kind, poisoned_memory):
    """An expert no token chose is an empty group, and dropped slots are rows past the last group: the CUDA
    kernel writes neither, in the forward or in the weight and input gradients. Both must come out exactly
    zero (idle expert) and finite, not whatever the memory held."""
    layer, x = layer_and_input(kind, idle_expert=True)
    y, grads, aux = forward_backward(layer, x, torch.randn_like(x), bf16=True)
    assert aux['expert_counts'][0].item() == 0 and aux['expert_counts'][1:].min().item() > 0
    if kind == 'moe':
        assert aux['dropped_frac'].item() > 0
    assert torch.isfinite(y).all()
    for name, g in zip(names(layer), grads):
        assert torch.isfinite(g).all(), name
    for name in ('w_gate', 'w_up', 'w_down'):
        g = grads[names(layer).index(name)]
        assert g[0].abs().max().item() == 0.0, f'{name}[0] of the idle expert got a gradient'
        assert g[1:].abs().amax(dim=(1, 2)).min().item() > 0, name


@cuda_only
@needs_fast_grouped_mm
@pytest.mark.parametrize('kind', LAYERS)
def test_moe_forward_and_backward_never_sync_with_the_host(kind):
    """A training step of the layer (forward, aux loss, backward, bias update) queues work without waiting
    for the GPU: a host sync per layer (a .item(), a .tolist(), a boolean mask) would stall every step."""
    layer, x = layer_and_input(kind)
    x.requires_grad_()
    grad_out = torch.randn_like(x)

    def step():
        with torch.autocast('cuda', dtype=torch.bfloat16):
            y, aux = layer(x)
        torch.autograd.backward([y, aux['aux_loss']], [grad_out.to(y.dtype), torch.ones_like(aux['aux_loss'])])
        layer.update_bias(aux['expert_counts'])
    step()                                         # warm-up: allocations, lazy initialisation, cuBLAS handles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode('default')
    torch.cuda.synchronize()
    assert torch.isfinite(x.grad).all()


# -----------------------------------------------------------------------------
# the model compiled by inductor, and train.py


@needs_grouped_mm
@pytest.mark.parametrize('kind', KINDS)
def test_compiled_model_keeps_one_graph_as_routing_changes(kind):
    """tests/test_model.py checks graph capture with aot_eager on the CPU; here the real thing: inductor on
    CUDA, bf16 autocast, fused AdamW, the bias update, five steps whose routing changes, and the MoE's expert
    matmuls in the compiled graph still grouped_mm (inductor calls aten's kernel unless max-autotune)."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = tiny(kind).to(DEVICE)
    compiled = torch.compile(model)
    opt = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), DEVICE)
    if DEVICE == 'cuda':
        assert opt.defaults.get('fused'), 'configure_optimizers should pick fused AdamW on CUDA'
    loads = []

    def step():
        idx = torch.randint(0, 256, (4, 16), device=DEVICE)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            _, loss, aux = compiled(idx, idx, return_aux=True)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_moe_biases(aux['expert_counts'])
        loads.append(aux['expert_counts'].cpu())
        return loss
    for _ in range(4):
        loss = step()
    assert ran_grouped_mm(step) == (kind != 'dense'), 'the compiled MoE did not call grouped_mm'   # the 5th step
    assert torch.isfinite(loss)
    if kind != 'dense':
        assert any(not torch.equal(loads[0], load) for load in loads[1:]), 'routing never changed'
    assert counters['stats']['unique_graphs'] == 1, dict(counters['stats'])
    assert not counters['recompiles'] and not counters['graph_break'], (dict(counters['recompiles']),
                                                                         dict(counters['graph_break']))
    torch._dynamo.reset()


@needs_grouped_mm
def test_train_py_on_cuda_compiled(tmp_path):
    """python train.py config/deepseek_moe.py as on the GPU (bf16 and compile, the defaults there, asked for),
    at a tiny size: it finishes, says where it ran, logs MFU (H200 and the like are in runtime.GPU_PEAK_FLOPS;
    the CPU has no peak, so no MFU) and a finite validation loss."""
    data = random_token_data(tmp_path / 'data', vocab=128, n_tokens=20_000)
    out = tmp_path / 'out'
    args = ['train.py', 'config/deepseek_moe.py', f'--device={DEVICE}', '--dtype=bfloat16', '--compile=True',
            '--n_layer=2', '--n_embd=64', '--n_head=2', '--block_size=32', '--batch_size=8', '--vocab_size=128',
            '--max_iters=20', '--lr_decay_iters=20', '--warmup_iters=5', '--eval_interval=10', '--eval_iters=4',
            '--log_interval=5', f'--data_dir={data}', f'--out_dir={out}']
    p = subprocess.run([sys.executable, *args], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                       timeout=400)
    assert p.returncode == 0, f'{p.stdout}\n{p.stderr}'
    first = p.stdout.splitlines()[0]
    assert first.startswith(f'device {DEVICE}') and 'compile on' in first and 'bfloat16' in first, first
    if DEVICE == 'cpu' or capability() >= (8, 0):      # runtime.choose_runtime: grouped_mm wherever it takes bf16
        assert 'MoE dispatch grouped' in first, first
    with open(os.path.join(out, 'metrics.jsonl')) as f:
        rows = [json.loads(line) for line in f]
    assert rows[0]['type'] == 'config' and rows[0]['runtime']['compile'] and rows[0]['dtype'] == 'bfloat16'
    train_rows = [r for r in rows if r['type'] == 'train']
    assert [r['iter'] for r in train_rows] == [5, 10, 15, 20]
    if DEVICE == 'cuda':
        # a tiny model is a tiny fraction of the peak (it may round to 0.0); what matters is that the GPU's peak
        # was found, else train.py logs no mfu at all
        assert all(isinstance(r.get('mfu'), float) and r['mfu'] >= 0 for r in train_rows), train_rows
    evals = [r for r in rows if r['type'] == 'eval']
    assert [r['iter'] for r in evals] == [0, 10, 20]
    assert all(math.isfinite(r['val_loss']) for r in evals), evals
    assert os.path.isfile(os.path.join(out, 'ckpt.pt'))
