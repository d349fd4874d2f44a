"""model.py: the GPT around the FFNs, its parameter counts, optimizer groups, checkpoints and compile."""

import math
import re

import pytest
import torch

from model import GPT, GPTConfig, MLP, Machine, choose_runtime, load_checkpoint, probe_machine
from moe import MoE

TINY = dict(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=32, ffn_hidden=64)
KINDS = {
    'dense': dict(ffn_type='dense'),
    'moe': dict(ffn_type='moe', n_experts=4, top_k=2, expert_hidden=32, capacity_factor=1.25,
                balance_loss_coef=0.01, z_loss_coef=0.001, aux_loss_coef=0.01),
    'deepseek_moe': dict(ffn_type='deepseek_moe', n_experts=14, top_k=3, n_shared_experts=2, expert_hidden=8,
                         score_func='sigmoid', bias_update_speed=0.01, seq_aux_coef=0.001),
}


def tiny(kind: str, **kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**TINY, **KINDS[kind], **kw}))


@pytest.mark.parametrize('kind', KINDS)
def test_forward_shapes_and_initial_loss(kind):
    model = tiny(kind)
    idx = torch.randint(0, 256, (3, 16))
    targets = torch.randint(0, 256, (3, 16))
    logits, loss, aux = model(idx, targets, return_aux=True)
    assert logits.shape == (3, 16, 256)
    assert abs(aux['ce_loss'].item() - math.log(256)) < 0.1        # near-uniform predictions at init
    n_moe = 0 if kind == 'dense' else 2
    assert aux['expert_counts'].shape[0] == n_moe and aux['dropped_frac'].shape == (n_moe,)
    if kind != 'dense':
        k = model.config.top_k
        assert aux['expert_counts'].sum(-1).tolist() == [3 * 16 * k] * n_moe     # every token-slot counted
        assert aux['aux_loss'].item() > 0
    # the objective is cross-entropy plus the weighted auxiliary losses
    torch.testing.assert_close(loss, aux['ce_loss'] + aux['aux_loss'])
    logits, loss = model(idx)                                        # inference: last position only
    assert logits.shape == (3, 1, 256) and loss is None


def test_aux_losses_weighted_by_their_coefficients():
    model = tiny('moe')
    idx = torch.randint(0, 256, (2, 16))
    _, _, aux = model(idx, idx, return_aux=True)
    expected = (0.01 * aux['importance_loss'] + 0.01 * aux['balance_loss'] + 0.001 * aux['z_loss']) * 2  # 2 layers
    torch.testing.assert_close(aux['aux_loss'], expected)


def test_n_dense_layers_keeps_first_blocks_dense():
    model = tiny('deepseek_moe', n_layer=3, n_dense_layers=1)
    assert isinstance(model.transformer.h[0].ffn, MLP)
    assert all(isinstance(model.transformer.h[i].ffn, MoE) for i in (1, 2))
    assert model.moe_layer_ids() == [1, 2]


def test_param_counts_by_hand():
    model = tiny('moe')
    total = sum(p.numel() for p in model.parameters()) - 16 * 32       # without wpe
    per_expert = 3 * 32 * 32
    assert model.param_counts() == {'total': total, 'active': total - 2 * (4 - 2) * per_expert}
    dense = tiny('dense')
    # dense: embeddings + per block (ln 2*32, attn 4*32*32, SwiGLU 3*32*64) + ln_f
    assert dense.param_counts()['total'] == 256 * 32 + 2 * (2 * 32 + 4 * 32 * 32 + 3 * 32 * 64) + 32


def test_mfu_counts_active_params():
    model = tiny('moe')
    n_active = model.param_counts()['active']
    flops_per_token = 6 * n_active + 12 * 2 * 2 * 16 * 16
    assert model.flops_per_token() == flops_per_token
    assert model.estimate_mfu(4, 0.5, 1e12) == pytest.approx(flops_per_token * 16 * 4 / 0.5 / 1e12)


def test_optimizer_groups_and_balancing_bias_is_not_optimised():
    model = tiny('deepseek_moe', bias=True)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
    decay, no_decay = opt.param_groups
    assert decay['weight_decay'] == 0.1 and no_decay['weight_decay'] == 0.0
    assert all(p.dim() >= 2 for p in decay['params']) and all(p.dim() < 2 for p in no_decay['params'])
    layer = model.transformer.h[0].ffn
    assert any(p is layer.w_gate for p in decay['params'])                  # stacked experts decay
    assert any(p is model.transformer.h[0].ln_1.weight for p in no_decay['params'])
    ids = {id(p) for g in opt.param_groups for p in g['params']}
    assert id(layer.expert_bias) not in ids
    assert any(name.endswith('expert_bias') for name, _ in model.named_buffers())
    assert len(ids) == len(list(model.parameters()))                        # tied weight counted once


def test_residual_projections_get_scaled_init():
    model = GPT(GPTConfig(**{**TINY, **KINDS['moe'], 'n_embd': 128, 'expert_hidden': 256, 'n_layer': 8}))
    resid = 0.02 / math.sqrt(16)
    layer = model.transformer.h[0].ffn
    assert layer.w_down.std().item() == pytest.approx(resid, rel=0.05)
    assert layer.w_gate.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.transformer.h[0].attn.c_proj.weight.std().item() == pytest.approx(resid, rel=0.05)
    assert model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.parametrize('bad, message', [
    (dict(ffn_type='moe', n_experts=4, top_k=5), 'top_k=5 is impossible'),
    (dict(ffn_type='moe', n_experts=4, top_k=0), 'top_k=0 is impossible'),
    (dict(ffn_type='sparse'), 'ffn_type must be'),
    (dict(ffn_type='moe', score_func='sigmoid'), "use it with ffn_type='deepseek_moe'"),
    (dict(n_embd=30, n_head=4), 'divisible'),
    (dict(ffn_type='moe', moe_dispatch='fast'), 'moe_dispatch'),
])
def test_config_errors_name_the_problem(bad, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{**TINY, **bad})


@pytest.mark.parametrize('kind', ['moe', 'deepseek_moe'])
def test_grouped_and_loop_dispatch_agree_inside_the_model(kind):
    a, b = tiny(kind, moe_dispatch='grouped'), tiny(kind, moe_dispatch='loop')
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, 256, (2, 16))
    la, lb = a(idx, idx)[1], b(idx, idx)[1]
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize('kind', ['moe', 'deepseek_moe'])
def test_eval_is_causal_and_batch_independent_with_a_capacity(kind):
    """With a capacity, which slots overflow is decided over the whole batch. In training that makes a
    token's output depend on later tokens and other sequences; evaluation and sampling must not."""
    model = tiny(kind, capacity_factor=0.5)
    a = torch.randint(0, 256, (4, 16))
    b = a.clone()
    b[:, 8:] = torch.randint(0, 256, (4, 8))                    # only the later tokens change
    alone = a[:1]                                                # the first sequence without the others

    def gaps(model) -> tuple[float, float]:
        la, lb, l1 = (model(x, x)[0] for x in (a, b, alone))
        return (la[:, :8] - lb[:, :8]).abs().max().item(), (la[:1] - l1).abs().max().item()
    causal_gap, batch_gap = gaps(model)
    assert causal_gap > 1e-4 and batch_gap > 1e-4               # training mode: the capacity leaks (and the test sees it)
    model.eval()
    causal_gap, batch_gap = gaps(model)
    assert causal_gap < 1e-5 and batch_gap < 1e-5


def test_generate_runs_in_eval_mode_and_restores_the_mode():
    model = tiny('moe', capacity_factor=0.5)
    seen = []
    model.transformer.h[0].ffn.register_forward_hook(lambda m, i, o: seen.append((m.training, o[1]['dropped_frac'].item())))
    model.generate(torch.zeros(3, 4, dtype=torch.long), max_new_tokens=3)
    assert seen and all(not training and dropped == 0 for training, dropped in seen)
    assert model.training


def test_update_moe_biases_per_layer():
    model = tiny('deepseek_moe')
    counts = torch.zeros(2, 14)
    counts[0, 0] = 100.0          # layer 0: expert 0 overloaded, the rest under
    counts[1] = 7.0               # layer 1: perfectly even, nothing moves
    model.update_moe_biases(counts)
    b0, b1 = (layer.expert_bias for layer in model.moe_layers())
    assert b0[0].item() == pytest.approx(-0.01) and b0[1:].tolist() == pytest.approx([0.01] * 13)
    assert b1.abs().sum().item() == 0.0


def test_generate_extends_the_sequence():
    model = tiny('deepseek_moe')
    out = model.generate(torch.zeros(2, 3, dtype=torch.long), max_new_tokens=20, temperature=0.8, top_k=5)
    assert out.shape == (2, 23) and out.max() < 256


def test_load_checkpoint_round_trip_and_errors(tmp_path):
    model = tiny('deepseek_moe')
    model.moe_layers()[0].expert_bias.fill_(0.5)
    path = tmp_path / 'ckpt.pt'
    state = {'_orig_mod.' + k: v for k, v in model.state_dict().items()}      # as saved from a compiled model
    from dataclasses import asdict
    torch.save({'model': state, 'model_args': asdict(model.config), 'iter_num': 3}, path)
    loaded, ckpt = load_checkpoint(str(path))
    assert ckpt['iter_num'] == 3
    assert loaded.moe_layers()[0].expert_bias[0].item() == 0.5
    idx = torch.randint(0, 256, (1, 16))
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0])
    with pytest.raises(FileNotFoundError, match='not found'):
        load_checkpoint(str(tmp_path / 'missing.pt'))
    bad = tmp_path / 'bad.pt'
    bad.write_bytes(b'not a checkpoint at all')
    with pytest.raises(ValueError, match='corrupt'):
        load_checkpoint(str(bad))
    truncated = tmp_path / 'truncated.pt'
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match='corrupt'):
        load_checkpoint(str(truncated))


@pytest.mark.parametrize('kind', KINDS)
def test_compile_does_not_recompile_as_routing_changes(kind):
    """One dynamo graph for a whole training run: routing (counts, offsets, the balancing bias) changes
    every step but lives in tensors, never in Python values that dynamo would guard on. bf16 autocast,
    as train.py uses on CUDA, keeps the MoE on the grouped_mm path (the float32 compiled path falls back to
    the expert loop, which breaks the graph). aot_eager checks the graph capture without inductor's C++ build."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = tiny(kind)
    compiled = torch.compile(model, backend='aot_eager')
    opt = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), 'cpu')
    for step in range(5):
        idx = torch.randint(0, 256, (4, 16))
        with torch.autocast('cpu', dtype=torch.bfloat16):
            _, loss, aux = compiled(idx, idx, return_aux=True)
        loss.backward()
        opt.step()
        opt.zero_grad()
        model.update_moe_biases(aux['expert_counts'])
    assert torch.isfinite(loss)
    assert counters['stats']['unique_graphs'] == 1
    assert not counters['recompiles'] and not counters['graph_break']


# -----------------------------------------------------------------------------
# The runtime decisions, for the machines our users have (by hand, without the hardware)

TORCH = '2.13.0+cu130'
H100 = Machine(TORCH, (('NVIDIA H100 80GB HBM3', (9, 0)),), cuda_built=True)
A100 = Machine(TORCH, (('NVIDIA A100-SXM4-40GB', (8, 0)),), cuda_built=True)
RTX4090 = Machine(TORCH, (('NVIDIA GeForce RTX 4090', (8, 9)),), cuda_built=True)
T4 = Machine(TORCH, (('Tesla T4', (7, 5)),), cuda_built=True)
V100 = Machine(TORCH, (('Tesla V100-SXM2-16GB', (7, 0)),), cuda_built=True)
MAC = Machine('2.13.0', mps_available=True)
CPU = Machine('2.13.0+cpu')


@pytest.mark.parametrize('machine, device, dtype, dispatch, compile, scaler', [
    (H100, 'cuda', 'bfloat16', 'grouped', True, False),   # grouped_mm's CUTLASS kernel: Hopper, bf16
    (A100, 'cuda', 'bfloat16', 'loop', True, False),      # grouped_mm runs, but syncs and loops below sm90
    (RTX4090, 'cuda', 'bfloat16', 'loop', True, False),
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
    assert 'pytorch#186620' in choose_runtime(A100).dispatch_why


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


def test_where_says_what_the_device_is():
    assert choose_runtime(H100, device='cpu').summary().startswith('device cpu (as requested): float32')
    assert choose_runtime(CPU).where == 'no CUDA GPU, no MPS'
    assert choose_runtime(MAC, device='cpu').where == 'as requested'


def test_probe_machine_reads_this_one():
    m = probe_machine()
    assert m.torch_version == torch.__version__ and len(m.cuda_gpus) == torch.cuda.device_count()
    assert choose_runtime(m).device_type in ('cuda', 'mps', 'cpu')
