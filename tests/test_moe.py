"""moe.py against hand-computed numbers and a naive reference (a loop over tokens, every expert dense)."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from configurator import configure
from model import GPT, GPTConfig, MLP
from moe import (MoE, coefficient_of_variation, expert_capacity, expert_load, grouped_mm_runs, importance,
                 importance_loss, load_balance_loss, max_vio, router_z_loss, sequence_balance_loss)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# -----------------------------------------------------------------------------
# The worked numbers of the balancing lesson

# 4 tokens, 3 experts, top-2: the selector-weight matrix G (gate where chosen, else 0)
G = torch.tensor([[0.5, 0.5, 0.0],
                  [0.3, 0.0, 0.7],
                  [0.6, 0.4, 0.0],
                  [0.0, 0.1, 0.9]])


def test_importance_is_column_sums_of_selector_weights():
    imp = importance(G)
    assert torch.allclose(imp, torch.tensor([1.4, 1.0, 1.6]))
    pi = imp / G.shape[0]                      # pi_i = importance_i / tokens
    assert pi[0].item() == pytest.approx(0.35)  # 1.4 over 4 tokens


def test_importance_loss_cv_squared_by_hand():
    # importance (1.4, 1.0, 1.6): mean 4/3; population variance
    # ((1.4-4/3)^2 + (1.0-4/3)^2 + (1.6-4/3)^2) / 3 = (0.004444 + 0.111111 + 0.071111) / 3 = 0.062222
    # CV^2 = 0.062222 / (4/3)^2 = 0.035; with lambda = 0.1 the loss is 0.0035
    assert importance_loss(G).item() == pytest.approx(0.035, rel=1e-4)
    assert 0.1 * importance_loss(G).item() == pytest.approx(0.0035, rel=1e-4)
    assert importance_loss(torch.full((4, 3), 0.5)).item() == pytest.approx(0.0, abs=1e-9)


def test_load_fraction_and_switch_loss_by_hand():
    # top-1 routing of 4 tokens: two go to expert 0, one to each of experts 1 and 2
    idx = torch.tensor([[0], [0], [1], [2]])
    load = expert_load(idx, 3)
    assert load.tolist() == [2.0, 1.0, 1.0]
    assert (load / idx.numel())[0].item() == 0.5              # F_0 = 2/4
    probs = torch.tensor([[0.6, 0.2, 0.2], [0.5, 0.3, 0.2], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8]])
    # P = (0.35, 0.3, 0.35); F = (0.5, 0.25, 0.25); N * sum F P = 3 * (0.175 + 0.075 + 0.0875) = 1.0125
    assert load_balance_loss(probs, idx, 3).item() == pytest.approx(1.0125, rel=1e-6)
    # perfectly uniform routing and probabilities give exactly 1
    uniform_idx = torch.tensor([[0], [1], [2]])
    assert load_balance_loss(torch.full((3, 3), 1 / 3), uniform_idx, 3).item() == pytest.approx(1.0)


def test_capacity_formula():
    # top-1: capacity = tokens / experts * capacity factor
    assert expert_capacity(1024, 8, 1, 1.0) == 128
    assert expert_capacity(1024, 8, 1, 1.25) == 160
    # top-2: twice the token-slots, twice the capacity
    assert expert_capacity(1024, 8, 2, 1.25) == 320
    assert expert_capacity(10, 4, 1, 1.0) == 3           # 2.5 rounded up
    assert expert_capacity(1024, 8, 2, 0.0) == 0         # 0 = dropless


def test_z_loss_maxvio_cv_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp: log 2 and log 4 -> mean of squares
    assert router_z_loss(logits).item() == pytest.approx((math.log(2) ** 2 + math.log(4) ** 2) / 2)
    load = torch.tensor([4.0, 2.0, 1.0, 1.0])               # mean 2, max 4
    assert max_vio(load).item() == pytest.approx(1.0)
    assert coefficient_of_variation(load).item() == pytest.approx(math.sqrt(1.5) / 2)
    assert max_vio(torch.ones(8)).item() == 0.0


def test_sequence_balance_loss_by_hand():
    # one sequence, T = 2 tokens, E = 2 experts, k = 1
    scores = torch.tensor([[0.8, 0.2], [0.4, 0.6]])
    idx = torch.tensor([[0], [0]])
    # f = E/(kT) * counts = 2/2 * (2, 0) = (2, 0); P = mean of row-normalised scores = (0.6, 0.4); L = 1.2
    assert sequence_balance_loss(scores, idx, 2, 1).item() == pytest.approx(1.2)
    # two sequences are averaged: the second is balanced (f = (1, 1), P = (0.5, 0.5): L = 1)
    scores2 = torch.cat([scores, torch.tensor([[0.5, 0.5], [0.5, 0.5]])])
    idx2 = torch.cat([idx, torch.tensor([[0], [1]])])
    assert sequence_balance_loss(scores2, idx2, 2, 2).item() == pytest.approx(1.1)


# -----------------------------------------------------------------------------
# Naive reference: route each token on its own, run every expert densely, add up by hand


def make_layer(ffn_type='moe', n_experts=6, top_k=2, n_embd=16, hidden=8, shared=0, capacity_factor=0.0,
               score_func='softmax', dispatch='grouped', seed=0, **kw) -> MoE:
    cfg = GPTConfig(n_embd=n_embd, n_head=2, ffn_type=ffn_type, n_experts=n_experts, top_k=top_k,
                    expert_hidden=hidden, n_shared_experts=shared, capacity_factor=capacity_factor,
                    score_func=score_func, moe_dispatch=dispatch, **kw)
    torch.manual_seed(seed)
    layer = MoE(cfg, MLP(cfg, shared * hidden) if shared else None)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    return layer


def naive_moe(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    B, T, C = x.shape
    xs = x.reshape(B * T, C)
    N, E, k = xs.shape[0], layer.n_experts, layer.top_k
    W = layer.router.weight
    all_out = torch.stack([F.silu(xs @ layer.w_gate[e].T) * (xs @ layer.w_up[e].T) @ layer.w_down[e].T
                           for e in range(E)], dim=1)                  # (N, E, C): every expert, every token
    capacity = expert_capacity(N, E, k, layer.capacity_factor) if layer.training else 0   # dropless in eval
    chosen, gate_values = [], []
    for t in range(N):                                                # route token by token
        u = W @ xs[t]
        s = torch.sigmoid(u) if layer.score_func == 'sigmoid' else torch.softmax(u, 0)
        sel = sorted(range(E), key=lambda e: -(s[e] + layer.expert_bias[e]).item())[:k]
        if not layer.deepseek and k == 1:
            g = torch.softmax(u, 0)[sel]                              # Switch: the full softmax's probability
        elif not layer.deepseek:
            g = torch.exp(u[sel]) / torch.exp(u[sel]).sum()           # softmax over the kept logits
        elif layer.score_func == 'sigmoid':
            g = s[sel] / s[sel].sum()
        else:
            g = s[sel]
        chosen.append(sel)
        gate_values.append(g)
    load = [0] * E
    keep = [[True] * k for _ in range(N)]
    if capacity:
        for j in range(k):                       # first choices have priority over second choices
            for t in range(N):                   # and earlier tokens over later ones
                e = chosen[t][j]
                keep[t][j] = load[e] < capacity
                load[e] += 1
    rows = []
    for t in range(N):
        y = torch.zeros(C)
        for j in range(k):
            if keep[t][j]:
                y = y + gate_values[t][j] * all_out[t, chosen[t][j]]
        if layer.shared_experts is not None:
            y = y + layer.shared_experts(xs[t])
        rows.append(y)
    return torch.stack(rows).view(B, T, C)


CASES = [
    dict(ffn_type='moe'),
    dict(ffn_type='moe', capacity_factor=1.0),
    dict(ffn_type='moe', hidden=32, capacity_factor=1.0),      # H > C: the gate multiplies the output rows
    dict(ffn_type='moe', top_k=1, capacity_factor=0.5),
    dict(ffn_type='deepseek_moe', n_experts=12, top_k=3, hidden=8, shared=2),
    dict(ffn_type='deepseek_moe', n_experts=12, top_k=3, hidden=8, shared=2, score_func='sigmoid'),
    dict(ffn_type='deepseek_moe', n_experts=12, top_k=3, hidden=8, shared=1, score_func='sigmoid',
         capacity_factor=1.0),
]


def assert_matches_naive(layer: MoE, x: torch.Tensor) -> dict:
    """The layer's output and the gradients of x and of every parameter equal the naive reference's
    (float32, 1e-5). Returns the layer's aux dict."""
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_fast, aux = layer(x1)
    y_ref = naive_moe(layer, x2)
    torch.testing.assert_close(y_fast, y_ref, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(y_ref)
    g_fast = torch.autograd.grad((y_fast * grad_out).sum(), [x1, *layer.parameters()])
    g_ref = torch.autograd.grad((y_ref * grad_out).sum(), [x2, *layer.parameters()], allow_unused=True)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b, atol=1e-5, rtol=1e-5)
    return aux


def test_grouped_mm_runs_where_its_kernels_take_the_dtype():
    assert grouped_mm_runs('cuda', torch.bfloat16, compiling=True)
    assert not grouped_mm_runs('cuda', torch.float16, compiling=False)
    assert not grouped_mm_runs('cuda', torch.float32, compiling=False)
    assert grouped_mm_runs('cpu', torch.float32, compiling=False)
    assert not grouped_mm_runs('cpu', torch.float32, compiling=True)      # compiled: bf16 only
    assert grouped_mm_runs('cpu', torch.bfloat16, compiling=True)
    assert not grouped_mm_runs('cpu', torch.float64, compiling=False)
    assert not grouped_mm_runs('mps', torch.bfloat16, compiling=False)


def test_widths_grouped_mm_cannot_take_fall_back_to_the_loop():
    """grouped_mm wants 16-byte row strides: n_embd 12 and expert_hidden 6 are 48 and 24 bytes in fp32."""
    assert not grouped_mm_runs('cpu', torch.float32, False, widths=(12, 6))
    assert grouped_mm_runs('cpu', torch.float32, False, widths=(12, 8))
    layer = make_layer(n_embd=12, hidden=6, dispatch='grouped')
    assert_matches_naive(layer, torch.randn(2, 5, 12))


@pytest.mark.parametrize('dispatch', ['auto', 'grouped'])
def test_float64_falls_back_to_the_loop_and_stays_exact(dispatch):
    """grouped_mm rejects float64: the layer must use the loop (no crash), and match the reference."""
    layer = make_layer(capacity_factor=1.0, dispatch=dispatch).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    y, _ = layer(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, naive_moe(layer, x), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize('case', [c for c in CASES if c.get('capacity_factor')], ids=str)
def test_eval_mode_is_dropless(case):
    layer = make_layer(**case)
    x = torch.randn(2, 7, 16)
    _, aux = layer(x)
    assert aux['dropped_frac'] > 0                          # training: this capacity drops slots
    layer.eval()
    _, aux = layer(x)
    assert aux['dropped_frac'] == 0
    assert_matches_naive(layer, x)                          # the reference, without a capacity


@pytest.mark.parametrize('dispatch', ['grouped', 'loop'])
@pytest.mark.parametrize('case', CASES, ids=lambda c: '-'.join(f'{k}={v}' for k, v in c.items()))
def test_fast_dispatch_equals_naive_reference(case, dispatch):
    layer = make_layer(dispatch=dispatch, **case)
    if layer.deepseek:
        with torch.no_grad():
            layer.expert_bias.copy_(torch.linspace(-0.3, 0.3, layer.n_experts))   # bias active in selection
    torch.manual_seed(1)
    aux = assert_matches_naive(layer, torch.randn(2, 10, 16))
    if case.get('capacity_factor'):
        assert aux['dropped_frac'].item() > 0     # the case really exercises dropping


@pytest.fixture
def poisoned_memory():
    """Every tensor torch allocates without writing (torch.empty, and the rows grouped_mm skips) is NaN."""
    import torch.utils.deterministic
    before = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.utils.deterministic.fill_uninitialized_memory = before[1]


@pytest.mark.parametrize('case', [c for c in CASES if c.get('capacity_factor')],
                         ids=lambda c: '-'.join(f'{k}={v}' for k, v in c.items()))
def test_rows_grouped_mm_skips_never_reach_outputs_or_gradients(case, poisoned_memory):
    """With capacity, grouped_mm leaves the dropped slots' rows unwritten (NaN here) in its output and in
    its input's gradient; the layer must mask both, or y and x.grad come out NaN."""
    layer = make_layer(dispatch='grouped', **case)
    torch.manual_seed(2)
    aux = assert_matches_naive(layer, torch.randn(2, 10, 16))
    assert aux['dropped_frac'].item() > 0


def test_capacity_never_exceeded_and_dropped_slots_are_zero():
    # a router that prefers expert 0 for every token: with top-1 and capacity 2, tokens past the
    # second get nothing from the routed experts (the residual path carries them in the model)
    layer = make_layer(ffn_type='moe', n_experts=4, top_k=1, capacity_factor=1.0)
    torch.manual_seed(0)
    x = torch.randn(1, 8, 16).abs()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0] = 1.0               # expert 0 wins for positive inputs
    gates, idx, _, _ = layer.route(x.view(8, 16))
    assert (idx == 0).all()
    capacity = expert_capacity(8, 4, 1, 1.0)
    assert capacity == 2
    order, counts, keep = layer._sort_slots(idx, expert_load(idx, 4), capacity)
    assert counts.max().item() <= capacity and keep.sum().item() == 2
    y, aux = layer(x)
    assert y[0, :2].abs().sum() > 0                # the first two tokens are processed
    assert torch.equal(y[0, 2:], torch.zeros_like(y[0, 2:]))   # the rest: exactly zero
    assert aux['dropped_frac'].item() == pytest.approx(6 / 8)
    assert aux['expert_counts'].tolist() == [8.0, 0.0, 0.0, 0.0]   # routed counts, before dropping


def test_topk_picks_distinct_experts_and_valid_gates():
    for case in CASES:
        layer = make_layer(**case)
        gates, idx, scores, _ = layer.route(torch.randn(50, 16))
        assert all(len(set(row)) == layer.top_k for row in idx.tolist())
        assert (gates >= 0).all()
        if not layer.deepseek and layer.top_k == 1:     # Switch: the chosen expert's full-softmax probability
            torch.testing.assert_close(gates[:, 0], scores.max(-1).values)
            assert (gates < 1).all()
        elif not layer.deepseek or layer.score_func == 'sigmoid':
            torch.testing.assert_close(gates.sum(-1), torch.ones(50))


# -----------------------------------------------------------------------------
# Auxiliary-loss-free balancing


def test_bias_changes_choice_not_gate_values():
    layer = make_layer(ffn_type='deepseek_moe', n_experts=8, top_k=2, score_func='softmax')
    x = torch.randn(30, 16)
    gates0, idx0, scores0, _ = layer.route(x)
    with torch.no_grad():
        layer.expert_bias[5] = 10.0                # expert 5 now always chosen
    gates1, idx1, scores1, _ = layer.route(x)
    assert (idx1 == 5).any(-1).all() and not (idx0 == 5).any(-1).all()
    torch.testing.assert_close(scores1, scores0)                         # affinities untouched
    torch.testing.assert_close(gates1, scores1.gather(1, idx1))          # gate = unbiased affinity
    # where the chosen set is unchanged, the gate values are identical
    same = (idx0.sort(-1).values == idx1.sort(-1).values).all(-1)
    assert same.any()


def test_one_bias_update_moves_by_gamma():
    layer = make_layer(ffn_type='deepseek_moe', n_experts=4, top_k=1, bias_update_speed=0.01)
    layer.update_bias(torch.tensor([10.0, 2.0, 4.0, 4.0]))    # mean 5
    assert layer.expert_bias.tolist() == pytest.approx([-0.01, 0.01, 0.01, 0.01])
    layer.update_bias(torch.tensor([5.0, 5.0, 9.0, 1.0]))     # exactly at the mean: no change
    assert layer.expert_bias.tolist() == pytest.approx([-0.01, 0.01, 0.0, 0.02])
    off = make_layer(ffn_type='deepseek_moe', n_experts=4, top_k=1, bias_update_speed=0.0)
    off.update_bias(torch.tensor([10.0, 2.0, 4.0, 4.0]))
    assert off.expert_bias.abs().sum().item() == 0.0


def test_proportional_rule_recentring_and_scale_by_hand():
    counts = torch.tensor([10.0, 2.0, 4.0, 4.0])                    # mean 5: (mean - load) / mean = (-1, 0.6, 0.2, 0.2)
    prop = make_layer(ffn_type='deepseek_moe', n_experts=4, top_k=1, bias_update_speed=0.01,
                      bias_update_rule='proportional')
    prop.update_bias(counts)
    assert prop.expert_bias.tolist() == pytest.approx([-0.01, 0.006, 0.002, 0.002])
    prop.update_bias(counts, scale=0.5)                              # the schedule halves gamma
    assert prop.expert_bias.tolist() == pytest.approx([-0.015, 0.009, 0.003, 0.003])
    # sign rule, re-centred: steps (-1, 1, 1, 1) * 0.01, minus their mean 0.005
    centred = make_layer(ffn_type='deepseek_moe', n_experts=4, top_k=1, bias_update_speed=0.01, bias_recenter=True)
    centred.update_bias(counts)
    assert centred.expert_bias.tolist() == pytest.approx([-0.015, 0.005, 0.005, 0.005])
    assert centred.expert_bias.sum().item() == pytest.approx(0.0, abs=1e-9)
    # re-centring shifts every bias by one constant: top-k, hence the routing, is the same as without it
    plain = make_layer(ffn_type='deepseek_moe', n_experts=4, top_k=1, bias_update_speed=0.01)
    plain.update_bias(counts)
    x = torch.randn(64, 16)
    assert torch.equal(plain.route(x)[1], centred.route(x)[1])
    with pytest.raises(ValueError, match='bias_update_rule must be sign|proportional'):
        make_layer(ffn_type='deepseek_moe', bias_update_rule='linear')


def test_repeated_bias_updates_balance_a_skewed_router():
    layer = make_layer(ffn_type='deepseek_moe', n_experts=8, top_k=2, score_func='sigmoid',
                       bias_update_speed=0.01)
    torch.manual_seed(0)
    x = torch.randn(512, 16)
    with torch.no_grad():
        layer.router.weight.mul_(0.2)
        layer.router.weight[:2] += 0.5 * x.mean(0) / x.mean(0).norm() ** 2 * 4   # experts 0, 1 favoured
    def maxvio_now():
        _, idx, _, _ = layer.route(x)
        return max_vio(expert_load(idx, 8)).item()
    before = maxvio_now()
    for _ in range(300):
        _, idx, _, _ = layer.route(x)
        layer.update_bias(expert_load(idx, 8))
    after = maxvio_now()
    assert before > 1.0
    assert after < 0.25 * before, (before, after)


def test_shared_experts_see_every_token():
    layer = make_layer(ffn_type='deepseek_moe', n_experts=8, top_k=2, shared=2)
    seen = []
    layer.shared_experts.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    x = torch.randn(3, 5, 16)
    y, _ = layer(x)
    assert seen[0].shape == (15, 16) and torch.equal(seen[0], x.view(15, 16))
    # and the layer output is routed part + shared part for every token
    gates, idx = layer.route(x.view(15, 16))[:2]
    routed, _ = layer.dispatch(x.view(15, 16), gates, idx, expert_load(idx, 8))
    torch.testing.assert_close(y.view(15, 16), routed + layer.shared_experts(x.view(15, 16)))


# -----------------------------------------------------------------------------
# The config files: standard MoE and DeepSeekMoE have the same size


def build_from_config(*names: str) -> GPT:
    """The model that python train.py config/<name> ... builds (the configurator runs the files), on the meta device:
    its shapes and settings without memory or initialisation (a 50M-parameter model costs ~1 s to initialise)."""
    from train import DEFAULTS, MODEL_KEYS
    settings = configure(DEFAULTS, [os.path.join(REPO, 'config', name) for name in names])
    with torch.device('meta'):
        return GPT(GPTConfig(**{k: settings[k] for k in MODEL_KEYS}))


@pytest.mark.parametrize('size', [(), ('tinystories_cpu.py',)], ids=['default size', 'cpu size'])
def test_every_config_has_the_size_of_config_moe(size):
    """Equal total and active parameters across the comparison and the ladder (within 2%); dense has the
    active size, dense_total the total size. At both the default and the CPU size (the overlay comes first)."""
    counts = {name: build_from_config(*size, f'{name}.py').param_counts()
              for name in ('moe', 'deepseek_moe', 'moe_finegrained', 'moe_shared', 'moe_expert_choice', 'dense',
                           'dense_total')}
    ref = counts['moe']
    for name, c in counts.items():
        if name != 'dense':
            assert abs(c['total'] - ref['total']) / ref['total'] < 0.02, (name, c, ref)
        if name != 'dense_total':
            assert abs(c['active'] - ref['active']) / ref['active'] < 0.02, (name, c, ref)
    assert counts['dense_total']['active'] == counts['dense_total']['total']
    if not size:   # by hand: per MoE layer a token skips 8 - 2 = 6 experts of 3 * 384 * 768 weights, in 6 layers
        assert ref['total'] - ref['active'] == 6 * (3 * 384 * 768) * 6
    # the FFN compute per token of dense_total is 4x the others': 16 n_embd hidden units against 4 n_embd
    n_embd = build_from_config(*size, 'dense_total.py').config.n_embd
    assert build_from_config(*size, 'dense_total.py').config.ffn_hidden == 4 * build_from_config(*size, 'dense.py').config.ffn_hidden == 16 * n_embd


def test_ladder_configs_add_deepseekmoe_s_ideas_rung_by_rung():
    moe, fine, shared, ds = (build_from_config(f'{n}.py').config for n in ('moe', 'moe_finegrained', 'moe_shared', 'deepseek_moe'))
    # rung 1: 4x finer experts, 4x larger top-k; the standard MoE's gating, Switch loss and capacity
    assert (fine.n_experts, fine.top_k, fine.expert_hidden * 4) == (32, 8, moe.expert_hidden)
    assert (fine.ffn_type, fine.balance_loss_coef, fine.capacity_factor) == ('moe', moe.balance_loss_coef, moe.capacity_factor)
    # rung 2: 2 of them shared, the rest routed
    assert (shared.n_shared_experts, shared.n_experts, shared.top_k, shared.expert_hidden) == (2, 30, 6, fine.expert_hidden)
    assert (shared.ffn_type, shared.balance_loss_coef, shared.capacity_factor) == ('moe', moe.balance_loss_coef, moe.capacity_factor)
    # rung 3: the same experts, balanced without an auxiliary loss; with it come DeepSeek-V3's other choices,
    # which results/cpu/README.md names: sigmoid gates renormalised over the chosen, no capacity, no z-loss
    assert (ds.n_shared_experts, ds.n_experts, ds.top_k, ds.expert_hidden) == (2, 30, 6, fine.expert_hidden)
    assert ds.balance_loss_coef == 0 and ds.bias_update_speed > 0
    assert (ds.ffn_type, ds.score_func, ds.capacity_factor, ds.z_loss_coef) == ('deepseek_moe', 'sigmoid', 0.0, 0.0)


# -----------------------------------------------------------------------------
# Expert-choice routing (Zhou et al. 2022)


def ec_layer(group=0, shared=0, capacity_factor=1.0, seed=0) -> MoE:
    return make_layer(ffn_type='moe', n_experts=4, top_k=2, shared=shared, routing='expert_choice',
                      expert_choice_group=group, capacity_factor=capacity_factor, seed=seed)


def naive_expert_choice(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """The definition, expert by expert: in each group of tokens, expert e sorts the tokens by their score for e
    (softmax over experts per token) and takes the first C; token t gets S[t, e] * expert_e(x_t) from each expert
    that took it, plus the shared experts."""
    B, T, C = x.shape
    xs = x.reshape(B * T, C)
    N, E, k = xs.shape[0], layer.n_experts, layer.top_k
    group = layer.expert_choice_group or N
    S = torch.softmax(xs @ layer.router.weight.T, dim=-1)
    cap = min(group, math.ceil(layer.capacity_factor * k * group / E))
    y = torch.zeros(N, C)
    for start in range(0, N, group):
        for e in range(E):
            chosen = sorted(range(start, start + group), key=lambda t: -S[t, e].item())[:cap]
            for t in chosen:
                out = (F.silu(xs[t] @ layer.w_gate[e].T) * (xs[t] @ layer.w_up[e].T)) @ layer.w_down[e].T
                y[t] = y[t] + S[t, e] * out
    if layer.shared_experts is not None:
        y = y + layer.shared_experts(xs)
    return y.view(B, T, C)


@pytest.mark.parametrize('group, shared', [(0, 0), (0, 2), (8, 0), (4, 1)], ids=['batch', 'batch-shared', 'group8', 'group4-shared'])
@pytest.mark.parametrize('dispatch', ['grouped', 'loop'])
def test_expert_choice_equals_its_definition(group, shared, dispatch):
    layer = ec_layer(group, shared)
    layer.dispatch_impl = dispatch
    x = torch.randn(2, 8, 16)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, aux = layer(x1)
    y_ref = naive_expert_choice(layer, x2)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(y)
    g_fast = torch.autograd.grad((y * grad_out).sum(), [x1, *layer.parameters()], allow_unused=True)
    g_ref = torch.autograd.grad((y_ref * grad_out).sum(), [x2, *layer.parameters()], allow_unused=True)
    for a, b in zip(g_fast, g_ref):
        if a is None or b is None:
            assert (a is None or not a.abs().sum()) and (b is None or not b.abs().sum())
            continue
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # every expert receives exactly C slots per group: C = 1.0 * 2 * group / 4
    n_groups = 1 if not group else 16 // group
    per_group = (group or 16) * 2 // 4
    assert aux['expert_counts'].tolist() == [n_groups * per_group] * 4 and aux['dropped_frac'] == 0


def test_expert_choice_token_counts_vary_and_every_expert_is_full():
    layer = ec_layer()
    x = torch.randn(1, 64, 16)
    token, gate, counts, scores, _ = layer.route_expert_choice(x.view(64, 16))
    assert counts.tolist() == [32] * 4 and token.numel() == 128       # C = 2 * 64 / 4 per expert
    per_token = torch.bincount(token, minlength=64)
    assert per_token.sum() == 128 and per_token.min() >= 0 and per_token.max() <= 4
    assert len(set(per_token.tolist())) > 1                           # a token gets 0 to E experts, not always k
    torch.testing.assert_close(gate, scores[token, torch.arange(4).repeat_interleave(32)])   # gate = S[t, e]


def test_expert_choice_leaks_the_future_in_training_and_eval_is_causal():
    """Training: an expert's top-C over the batch depends on later tokens, so changing them changes earlier
    outputs (the leak); within sequences or chunks, only the later tokens of the same sequence or chunk do. Eval
    routes each token by itself: earlier outputs never move, and no sequence depends on the others."""
    x = torch.randn(2, 16, 16)
    later = x.clone()
    later[:, 8:] = torch.randn(2, 8, 16)                  # only the second half of each sequence changes
    other = x.clone()
    other[1] = torch.randn(16, 16)                        # only the second sequence changes

    def gaps(layer) -> tuple[float, float]:
        y, y_later, y_other = (layer(v)[0] for v in (x, later, other))
        return (y[:, :8] - y_later[:, :8]).abs().max().item(), (y[0] - y_other[0]).abs().max().item()
    batch = ec_layer(group=0)
    causal_gap, batch_gap = gaps(batch)
    assert causal_gap > 1e-4 and batch_gap > 1e-4        # over the whole batch: both leaks
    per_sequence = ec_layer(group=16)
    causal_gap, batch_gap = gaps(per_sequence)
    assert causal_gap > 1e-4 and batch_gap == 0.0         # per sequence: the future of the same sequence only
    chunks = ec_layer(group=8)
    causal_gap, batch_gap = gaps(chunks)
    assert causal_gap == 0.0 and batch_gap == 0.0         # chunks of 8: the first half never sees the second
    y_chunk, y_chunk_later = chunks(x)[0], chunks(later)[0]
    assert (y_chunk[:, :4] - y_chunk_later[:, :4]).abs().max() == 0.0
    for layer in (batch, per_sequence, chunks):
        layer.eval()
        assert gaps(layer) == (0.0, 0.0)                  # token by token: causal and batch-independent
        gates, idx, scores, _ = layer.route(x.view(32, 16))
        torch.testing.assert_close(gates, scores.gather(1, idx))   # gated by the same scores as in training
    with torch.no_grad():                                 # the leaky evaluation routes as in training
        batch.leaky_eval = True
        assert gaps(batch)[0] > 1e-4


@pytest.mark.parametrize('bad, message', [
    (dict(capacity_factor=0.0), 'needs capacity_factor > 0'),
    (dict(balance_loss_coef=0.01), 'balanced by construction'),
    (dict(expert_choice_group=-1), 'expert_choice_group=-1 must be >= 0'),
])
def test_expert_choice_settings_are_checked(bad, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(n_embd=16, n_head=2, ffn_type='moe', routing='expert_choice', **{'capacity_factor': 1.0, **bad})
    with pytest.raises(ValueError, match='must divide the 10 tokens'):
        ec_layer(group=4)(torch.randn(1, 10, 16))


def test_every_document_the_code_points_to_is_in_the_repo():
    """A comment that sends a reader to a document (README.md, bench/RESULTS.md) must name a file of this repo:
    moe.py once pointed at a notes file that lives outside it."""
    import glob
    import re
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sources = [p for pattern in ('*.py', 'bench/*.py', 'data/*.py', 'data/*/*.py', 'results/*.py', 'tests/*.py')
               for p in glob.glob(os.path.join(repo, pattern))]
    assert len(sources) > 10
    missing = []
    for path in sources:
        with open(path) as f:
            # documents are named in capitals (README, RESULTS); a short one is a placeholder (OUT.md in a usage line)
            for name in re.findall(r'\b((?:[\w-]+/)*[A-Z][A-Z_]{4,}\.md)\b', f.read()):
                if not os.path.isfile(os.path.join(repo, name)):
                    missing.append(f"{os.path.relpath(path, repo)}: {name}")
    assert not missing, missing


def test_an_idle_expert_gets_a_zero_weight_gradient_whatever_grouped_mm_writes(monkeypatch):
    """pytorch#172439: on B200 grouped_mm's backward gave an expert with no rows a nonzero weight gradient. Here a
    grouped_mm whose backward writes NaN into every empty group's weight gradient stands in for that kernel: the
    layer must still give the idle expert exactly zero and every busy one its true gradient."""
    real = F.grouped_mm

    class EmptyGroupsPoisoned(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b, offs):
            ctx.save_for_backward(a, b, offs)
            return real(a, b, offs=offs)

        @staticmethod
        def backward(ctx, grad):
            a, b, offs = ctx.saved_tensors
            with torch.enable_grad():
                a_, b_ = a.detach().requires_grad_(), b.detach().requires_grad_()
                grad_a, grad_b = torch.autograd.grad(real(a_, b_, offs=offs), (a_, b_), grad)
            empty = torch.diff(offs, prepend=offs.new_zeros(1)) == 0
            return grad_a, torch.where(empty[:, None, None], float('nan'), grad_b), None

    layer = make_layer(ffn_type='moe', n_experts=6, top_k=2, dispatch='grouped')
    with torch.no_grad():
        layer.expert_bias[0] = -10.0                 # softmax scores lie in [0, 1]: expert 0 is never chosen
    x = torch.randn(2, 10, 16)
    monkeypatch.setattr(F, 'grouped_mm', lambda a, b, offs: EmptyGroupsPoisoned.apply(a, b, offs))
    aux = assert_matches_naive(layer, x)             # output and every gradient equal the naive reference's
    assert aux['expert_counts'][0].item() == 0 and aux['expert_counts'][1:].min().item() > 0
    layer.zero_grad()
    y, _ = layer(x)
    y.square().sum().backward()
    for w in (layer.w_gate, layer.w_up, layer.w_down):
        assert torch.equal(w.grad[0], torch.zeros_like(w.grad[0]))
        assert torch.isfinite(w.grad).all() and w.grad[1:].abs().amax(dim=(1, 2)).min() > 0
