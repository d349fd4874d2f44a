"""model.py: the GPT around the FFNs, its parameter counts, optimizer groups, checkpoints and compile."""

import math

import pytest
import torch

from model import GPT, GPTConfig, MLP, load_checkpoint
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


def test_aux_losses_weighted_by_their_coefficients_and_averaged_over_layers():
    """aux_loss = sum_j coef_j * (mean over MoE layers of loss_j): a coefficient means the same at any depth
    (the sum over layers made balance_loss_coef=0.01 act as 0.03 in these 3 layers)."""
    model = tiny('moe', n_layer=3)
    idx = torch.randint(0, 256, (2, 16))
    per_layer = []
    hooks = [m.register_forward_hook(lambda mod, i, out: per_layer.append(out[1])) for m in model.moe_layers()]
    _, _, aux = model(idx, idx, return_aux=True)
    for h in hooks:
        h.remove()
    assert len(per_layer) == 3
    by_hand = sum(0.01 * a['importance_loss'] + 0.01 * a['balance_loss'] + 0.001 * a['z_loss'] for a in per_layer) / 3
    torch.testing.assert_close(aux['aux_loss'], by_hand)
    expected = 0.01 * aux['importance_loss'] + 0.01 * aux['balance_loss'] + 0.001 * aux['z_loss']   # logged: layer means
    torch.testing.assert_close(aux['aux_loss'], expected)


@pytest.mark.parametrize('kind', KINDS)
def test_dropout_reaches_every_ffn_output(kind):
    """dropout applies to the FFN layer's output, the MoE's routed experts included (it once reached only the
    dense FFN and DeepSeekMoE's shared experts): in training two calls differ, in eval they do not."""
    ffn = tiny(kind, dropout=0.5).transformer.h[0].ffn
    x = torch.randn(2, 16, 32)
    a, b = ffn(x)[0], ffn(x)[0]
    assert (a - b).abs().max() > 1e-3
    assert ((a == 0).float().mean() - 0.5).abs() < 0.1       # about half of the outputs zeroed
    ffn.eval()
    torch.testing.assert_close(ffn(x)[0], ffn(x)[0])


def test_expert_choice_active_parameters_count_the_experts_a_token_visits_in_training():
    """Under expert choice a token visits capacity_factor * top_k experts on average in training: active parameters
    (and MFU's FLOPs) count those, so capacity_factor 2 at top-2 is 4 experts, as a token-choice top-4."""
    ec = dict(ffn_type='moe', n_experts=8, top_k=2, expert_hidden=32, routing='expert_choice', balance_loss_coef=0.0,
              z_loss_coef=0.0, aux_loss_coef=0.0)
    per_expert = 3 * 32 * 32
    one = tiny('moe', **{**ec, 'capacity_factor': 1.0}).param_counts()
    two = tiny('moe', **{**ec, 'capacity_factor': 2.0}).param_counts()
    assert one['total'] == two['total'] and two['active'] - one['active'] == 2 * 2 * per_expert   # 2 layers x 2 experts
    topk = tiny('moe', n_experts=8, top_k=2, expert_hidden=32, capacity_factor=1.0).param_counts()
    assert one['active'] == topk['active']


def test_top1_standard_moe_is_a_switch_layer_whose_router_learns():
    """At top_k=1 the gate is the chosen expert's full-softmax probability (Switch Transformer), so the language-
    model loss alone reaches the router; a softmax over one kept logit would be 1 and leave it without gradient."""
    model = tiny('moe', top_k=1, capacity_factor=0.0, balance_loss_coef=0.0, z_loss_coef=0.0, aux_loss_coef=0.0)
    idx = torch.randint(0, 256, (2, 16))
    _, loss = model(idx, idx)
    loss.backward()
    router = model.moe_layers()[0].router.weight
    assert router.grad is not None and router.grad.norm() > 1e-4
    gates, chosen, scores, _ = model.moe_layers()[0].route(torch.randn(8, 32))
    torch.testing.assert_close(gates, scores.gather(1, chosen))


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


@pytest.mark.parametrize('kind', KINDS)
def test_flops_per_token_match_torch_s_flop_counter(kind):
    """An independent count: torch's FlopCounterMode over one forward + backward (the expert loop, dropless, so
    every matmul is an aten.mm it sees) finds exactly 6 x the active parameters per token in matmuls; the
    LayerNorm weights are active parameters without a matmul. It does not count the CPU's SDPA kernel, so the
    attention term of flops_per_token (12 L H Q T) is checked by its formula."""
    from torch.utils.flop_counter import FlopCounterMode
    model = tiny(kind, moe_dispatch='loop', capacity_factor=0.0)
    idx = torch.randint(0, 256, (2, 16))
    with FlopCounterMode(display=False) as counter:
        _, loss = model(idx, idx)
        loss.backward()
    counts = {str(op): flops for op, flops in counter.get_flop_counts()['Global'].items()}
    assert set(counts) == {'aten.mm'}
    norms = sum(p.numel() for name, p in model.named_parameters() if '.ln_' in name or name.endswith('ln_f.weight'))
    assert norms == (2 * 2 + 1) * 32
    tokens = idx.numel()
    assert counts['aten.mm'] == 6 * (model.param_counts()['active'] - norms) * tokens
    attention = 12 * 2 * 2 * 16 * 16                    # 12 * n_layer * n_head * head size * block_size
    assert model.flops_per_token() == 6 * model.param_counts()['active'] + attention


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


def test_the_compiled_loop_breaks_the_graph_at_the_moe_layers():
    """Why runtime.choose_runtime takes grouped_mm below sm90 too: the expert loop needs its counts on the host
    (counts.tolist()), which ends the graph there, so a compiled model is many graphs (one with grouped_mm, above)."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = tiny('moe', moe_dispatch='loop')
    idx = torch.randint(0, 256, (4, 16))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        _, loss, _ = torch.compile(model, backend='eager')(idx, idx, return_aux=True)
    loss.backward()
    breaks = {reason.splitlines()[0] for reason in counters['graph_break']}
    assert counters['stats']['unique_graphs'] >= 2 * model.config.n_layer, dict(counters['stats'])
    assert any('Data dependent operator' in b for b in breaks), breaks
    torch._dynamo.reset()
