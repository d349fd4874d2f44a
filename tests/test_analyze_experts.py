"""analyze_experts.py: the interventions against a naive per-token reference, every measure by hand on small cases,
the model's own loss at r = 0 and k_eval = k, the user errors, and a whole analysis that leaves checkpoints as they were."""

import hashlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import analyze_experts as ae
from conftest import REPO, random_token_data, subprocess_env
from model import GPT, GPTConfig

TINY = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
DEEPSEEK = dict(ffn_type='deepseek_moe', n_experts=12, n_shared_experts=2, top_k=3, expert_hidden=16,
                score_func='sigmoid', bias_update_speed=0.01)
MOE = dict(ffn_type='moe', n_experts=8, top_k=2, expert_hidden=32, capacity_factor=1.25, balance_loss_coef=0.01)


def tiny_model(ffn: dict, seed: int = 0) -> GPT:
    """A tiny GPT in eval mode, its balancing biases random (so that s + b and s rank differently)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**TINY, **ffn))
    for layer in model.moe_layers():
        layer.expert_bias.normal_(0, 0.05)
    return model.eval()


# -----------------------------------------------------------------------------
# the intervention against a loop over tokens


def naive_output(layer, x: torch.Tensor, k: int, masked: int, shared: bool) -> torch.Tensor:
    """One token at a time, from the definitions: rank the experts by s + b, drop the first `masked`, take the next k,
    gate them (DeepSeek-V3: s over the sum of the chosen s; standard: softmax of the chosen logits), sum the experts."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        logits = x[t] @ layer.router.weight.T                              # (E,)
        s = torch.sigmoid(logits) if layer.score_func == 'sigmoid' else torch.softmax(logits, -1)
        order = sorted(range(layer.n_experts), key=lambda e: -(s[e] + layer.expert_bias[e]).item())
        chosen = order[masked:masked + k]
        if layer.deepseek:
            g = torch.stack([s[e] for e in chosen])
            g = g / g.sum()
        else:
            g = torch.softmax(torch.stack([logits[e] for e in chosen]), -1)
        for gate, e in zip(g, chosen):
            h = F.silu(layer.w_gate[e] @ x[t]) * (layer.w_up[e] @ x[t])
            out[t] += gate * (layer.w_down[e] @ h)
        if shared and layer.shared_experts is not None:
            out[t] += layer.shared_experts(x[t:t + 1])[0]
    return out


@pytest.mark.parametrize('ffn', [DEEPSEEK, MOE], ids=['deepseek_moe', 'moe'])
@pytest.mark.parametrize('k_delta, masked, shared', [(0, 0, True), (0, 2, True), (-1, 3, True), (2, 1, False), (0, 0, False)])
def test_masked_routing_equals_a_loop_over_tokens(ffn, k_delta, masked, shared):
    layer = tiny_model(ffn).moe_layers()[0]
    x = torch.randn(1, 10, TINY['n_embd'])
    with torch.no_grad():
        y, aux = ae.intervened_output(layer, x, layer.top_k + k_delta, masked, shared)
        ref = naive_output(layer, x[0], layer.top_k + k_delta, masked, shared)
    torch.testing.assert_close(y[0], ref, rtol=1e-5, atol=1e-6)
    assert aux['expert_counts'].sum() == 10 * (layer.top_k + k_delta)


def test_no_routed_expert_leaves_the_shared_experts_alone():
    layer = tiny_model(DEEPSEEK).moe_layers()[0]
    x = torch.randn(2, 5, TINY['n_embd'])
    with torch.no_grad():
        y, aux = ae.intervened_output(layer, x, 0, 0, True)
        torch.testing.assert_close(y, layer.shared_experts(x))
        assert aux['expert_counts'].sum() == 0
        assert torch.equal(ae.intervened_output(layer, x, 0, 0, False)[0], torch.zeros_like(x))


def test_masked_topk_without_masking_is_the_layers_own_routing():
    layer = tiny_model(DEEPSEEK).moe_layers()[0]
    x = torch.randn(40, TINY['n_embd'])
    gates, idx = ae.masked_topk(layer, x, layer.top_k, 0)
    own_gates, own_idx, _, _ = layer.route(x)
    assert torch.equal(idx, own_idx) and torch.equal(gates, own_gates)


@pytest.mark.parametrize('ffn', [DEEPSEEK, MOE], ids=['deepseek_moe', 'moe'])
def test_no_mask_and_k_eval_k_give_exactly_the_models_own_loss(ffn):
    model = tiny_model(ffn)
    X = torch.randint(0, TINY['vocab_size'], (6, TINY['block_size']))
    Y = torch.randint(0, TINY['vocab_size'], (6, TINY['block_size']))
    with torch.no_grad():
        own = sum(model(X[i:i + 2], Y[i:i + 2], return_aux=True)[2]['ce_loss'].item() for i in (0, 2, 4)) / 3
    top_k = model.moe_layers()[0].top_k
    with ae.intervention(model, masked_ratio=0.0):
        assert ae.val_loss(model, X, Y, 2) == own
    with ae.intervention(model, k=top_k):
        assert ae.val_loss(model, X, Y, 2) == own
    with ae.intervention(model, masked_ratio=0.25):
        assert ae.val_loss(model, X, Y, 2) != own       # the intervention does reach the model
    assert all('forward' not in vars(m) for m in model.moe_layers())        # and is gone after it


def test_masked_experts_rounds_halves_up():
    assert [ae.masked_experts(r, 8) for r in ae.MASK_RATIOS] == [0, 1, 1, 2, 2]
    assert [ae.masked_experts(r, 30) for r in ae.MASK_RATIOS] == [0, 2, 4, 6, 8]
    assert [ae.masked_experts(r, 32) for r in ae.MASK_RATIOS] == [0, 2, 4, 6, 8]


# -----------------------------------------------------------------------------
# the measures by hand


def test_vocab_specialization_by_hand():
    # E = 4, k = 2. Token 5 (4 times): expert 0 in all 4 -> p = 1. Token 7 (4 times): expert 1 in 2, expert 2 in 3,
    # expert 3 in 3 -> p = 3/4. Token 9 (once): below min_count, left out.
    ids = torch.tensor([5, 5, 5, 5, 7, 7, 7, 7, 9])
    idx = torch.tensor([[0, 1], [0, 2], [0, 3], [0, 1], [1, 2], [1, 3], [2, 3], [3, 2], [0, 1]])
    s = ae.vocab_specialization(ids, idx, 4, min_count=2)
    assert s['ids'] == 2
    assert s['p'] == pytest.approx((1 + 0.75) / 2)
    assert s['normalized'] == pytest.approx((0.875 - 0.5) / (1 - 0.5))
    assert ae.vocab_specialization(ids, idx, 4, min_count=5)['p'] is None


def test_coactivation_by_hand():
    # E = 3, k = 2: tokens chose {0, 1}, {0, 1}, {0, 2}, {1, 2}. N(0) = 3, N(1) = 3, N(2) = 2.
    idx = torch.tensor([[0, 1], [1, 0], [2, 0], [1, 2]])
    c = ae.coactivation(idx, 3)
    expected = torch.tensor([[math.nan, 2 / 3, 1 / 3], [2 / 3, math.nan, 1 / 3], [1 / 2, 1 / 2, math.nan]])
    torch.testing.assert_close(c, expected, equal_nan=True)
    summary = ae.coactivation_summary(c, 2)
    assert summary['max'] == pytest.approx(2 / 3)
    assert summary['mean_strongest_partner'] == pytest.approx((2 / 3 + 2 / 3 + 1 / 2) / 3)
    assert summary['uniform'] == pytest.approx(1 / 2)
    assert ae.strongest_pairs(c, 2) == [(0, 1, pytest.approx(2 / 3)), (1, 0, pytest.approx(2 / 3))]


def test_coactivation_of_an_expert_never_chosen_is_nan():
    c = ae.coactivation(torch.tensor([[0, 1], [1, 0]]), 3)
    assert torch.isnan(c[2]).all() and c[0, 1] == 1


def test_linear_cka_identical_rotated_and_independent():
    torch.manual_seed(0)
    x = torch.randn(4000, 16)
    rotation = torch.linalg.qr(torch.randn(16, 16))[0]
    assert ae.linear_cka(x, x) == pytest.approx(1.0, abs=1e-5)
    assert ae.linear_cka(x, 3 * x @ rotation + 1) == pytest.approx(1.0, abs=1e-5)   # rotation, scale, shift
    assert ae.linear_cka(x, torch.randn(4000, 16)) < 0.02                              # independent: ~ p / N
    outs = torch.stack([x, 2 * x, torch.randn(4000, 16)])
    pairs = [ae.linear_cka(outs[i], outs[j]) for i, j in ((0, 1), (0, 2), (1, 2))]
    assert ae.mean_pairwise_cka(outs) == pytest.approx(float(np.mean(pairs)), abs=1e-5)


def test_mean_pairwise_cosine_by_hand():
    # two tokens, three experts: on token 0 outputs e0 = e1 (cos 1), e2 orthogonal to both; on token 1 e0 = -e1
    outs = torch.tensor([[[1., 0.], [0., 1.]],
                         [[2., 0.], [0., -1.]],
                         [[0., 1.], [1., 0.]]])          # (E=3, N=2, C=2)
    # pairs (0,1): cos 1 and -1 -> 0; (0,2): 0 and 0 -> 0; (1,2): 0 and 0 -> 0
    assert ae.mean_pairwise_cosine(outs) == pytest.approx(0.0)
    outs[1, 1] = torch.tensor([0., 5.])                  # now (0,1) has cos 1 on both tokens
    assert ae.mean_pairwise_cosine(outs) == pytest.approx(1 / 3)


def test_expert_outputs_are_the_experts():
    layer = tiny_model(MOE).moe_layers()[0]
    x = torch.randn(5, TINY['n_embd'])
    outs = ae.expert_outputs(layer, x)
    e = 3
    ref = (F.silu(x @ layer.w_gate[e].T) * (x @ layer.w_up[e].T)) @ layer.w_down[e].T
    torch.testing.assert_close(outs[e], ref)


def test_consecutive_by_hand():
    # two sequences of 3 tokens, E = 4, k = 2. Pairs within a sequence: (0,1), (1,2), (3,4), (4,5).
    idx = torch.tensor([[0, 1], [0, 2], [3, 2],     # first: same, different; any: yes ({0}), yes ({2})
                        [1, 0], [2, 3], [2, 3]])    # first: different, same; any: no, yes
    c = ae.consecutive(idx, 3, 4)
    assert c['first'] == pytest.approx(2 / 4)
    assert c['any'] == pytest.approx(3 / 4)
    assert c['first_random'] == pytest.approx(1 / 4)
    assert c['any_random'] == pytest.approx(1 - 1 / 6)           # 1 - C(2, 2) / C(4, 2)
    assert ae.consecutive(torch.zeros(10, 2, dtype=torch.long), 5, 8)['any_random'] == pytest.approx(1 - 15 / 28)


# -----------------------------------------------------------------------------
# runs on disk: errors, and a whole analysis


def save_run(folder, ffn: dict, seed: int, data_dir: str, gpt2_ids=None) -> str:
    """A run directory holding the checkpoint train.py would write for a tiny model (not trained: the analysis only
    needs weights and settings)."""
    model = tiny_model(ffn, seed)
    config = {**TINY, **ffn, 'seed': seed, 'dataset': 'tiny', 'data_dir': data_dir, 'dtype': 'float32'}
    os.makedirs(folder, exist_ok=True)
    name = ffn['ffn_type'] if ffn != {} else 'dense'
    torch.save({'model': model.state_dict(), 'model_args': {**TINY, **ffn}, 'config': config, 'iter_num': 10,
                'config_files': [f'config/{name}.py'],
                'data': {'dataset': 'tiny', 'data_dir': data_dir, 'gpt2_ids': gpt2_ids}}, os.path.join(folder, 'ckpt.pt'))
    return str(folder)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp('runs')
    data = random_token_data(root / 'data', TINY['vocab_size'], 4000)
    return root, data, [save_run(root / f'deepseek_moe-s{s}', DEEPSEEK, s, data) for s in (1, 2)] + \
        [save_run(root / 'moe-s1', MOE, 1, data)]


def run_main(argv: list[str], capsys) -> tuple[int | str | None, str]:
    """analyze_experts.main() with argv, in this process: (exit code or message, what it printed)."""
    old = sys.argv
    sys.argv = ['analyze_experts.py'] + argv
    try:
        ae.main()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out + out.err


def test_a_whole_analysis_writes_every_measure_and_leaves_the_checkpoints_unchanged(runs, tmp_path, capsys, monkeypatch):
    root, _, dirs = runs
    digest = {d: hashlib.sha256(open(os.path.join(d, 'ckpt.pt'), 'rb').read()).hexdigest() for d in dirs}
    stamp = {d: os.stat(os.path.join(d, 'ckpt.pt')).st_mtime_ns for d in dirs}
    code, out = run_main(dirs + ['--out', str(tmp_path / 'out'), '--windows', '40', '--batch', '8', '--sim_tokens', '64'],
                         capsys)
    assert code == 0, out
    for d in dirs:
        assert hashlib.sha256(open(os.path.join(d, 'ckpt.pt'), 'rb').read()).hexdigest() == digest[d]
        assert os.stat(os.path.join(d, 'ckpt.pt')).st_mtime_ns == stamp[d]
        assert sorted(os.listdir(d)) == ['ckpt.pt']
    summary = json.load(open(tmp_path / 'out' / 'summary.json'))
    for key in ae.MEASURES:
        assert summary[key], key
    groups = {row['group']: row for row in summary['redundancy'] if row['ratio'] == 0.25}
    assert set(groups) == {'deepseek_moe', 'moe'}
    assert groups['deepseek_moe']['seeds'] == [1, 2] and groups['deepseek_moe']['masked'] == 3    # 0.25 * 12
    assert groups['deepseek_moe']['rise']['ci95'] is not None and groups['moe']['rise']['ci95'] is None
    moe = groups['moe']                                  # one seed: the share is the ratio of the two rises
    assert moe['rise_share']['mean'] == pytest.approx(moe['rise']['mean'] / moe['routed_off_rise']['mean'])
    assert [r['group'] for r in summary['shared_off']] == ['deepseek_moe']
    assert [r['k'] for r in summary['k_eval'] if r['group'] == 'moe'] == [1, 2]
    for f in ('summary.md', 'redundancy.png', 'k_eval.png', 'specialization.png', 'similarity.png', 'coactivation.png'):
        assert (tmp_path / 'out' / f).stat().st_size > 0
    assert '## 1. Redundancy' in out
    # again: every run's measures come back from out/runs/<run>.json, nothing is recomputed, the summary is the same
    assert sorted(os.listdir(tmp_path / 'out' / 'runs')) == ['deepseek_moe-s1.json', 'deepseek_moe-s2.json', 'moe-s1.json']
    first = (tmp_path / 'out' / 'summary.json').read_text()
    monkeypatch.setattr(ae, 'analyze_run', lambda *args, **kwargs: pytest.fail('a stored run was analysed again'))
    code, out = run_main(dirs + ['--out', str(tmp_path / 'out'), '--windows', '40', '--batch', '8', '--sim_tokens', '64'],
                         capsys)
    assert code == 0 and (tmp_path / 'out' / 'summary.json').read_text() == first, out


def test_stored_measures_are_used_only_for_the_same_checkpoint_and_settings(tmp_path):
    path = tmp_path / 'moe-s1.json'
    key = {'ckpt_sha256': 'ab', 'windows': 256}
    path.write_text(json.dumps({'key': key, 'result': {'val_loss': 3.0}}))
    assert ae.cached_result(str(path), dict(key)) == {'val_loss': 3.0}
    assert ae.cached_result(str(path), {**key, 'ckpt_sha256': 'cd'}) is None       # the checkpoint changed
    assert ae.cached_result(str(path), {**key, 'windows': 64}) is None              # other settings
    assert ae.cached_result(str(tmp_path / 'missing.json'), key) is None
    path.write_text('{"key": ')                                                      # cut off mid-write
    assert ae.cached_result(str(path), key) is None


def test_a_run_without_checkpoint_is_one_line(runs, tmp_path, capsys):
    (tmp_path / 'empty').mkdir()
    code, out = run_main([str(tmp_path / 'empty'), '--out', str(tmp_path / 'o')], capsys)
    assert isinstance(code, str) and code.startswith('error: ') and 'holds no ckpt.pt' in code and '\n' not in code


def test_the_script_as_a_process_exits_1_with_one_line(tmp_path):
    """The script's one run as a process of its own (the others call main() here): exit code 1, the error alone on
    stderr."""
    (tmp_path / 'empty').mkdir()
    p = subprocess.run([sys.executable, 'analyze_experts.py', str(tmp_path / 'empty'), '--out', str(tmp_path / 'o')],
                       cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and p.stderr.startswith('error: ') and p.stderr.count('\n') == 1, p.stderr
    assert 'holds no ckpt.pt' in p.stderr and not (tmp_path / 'o').exists()


def test_a_dense_run_is_one_line(runs, tmp_path, capsys):
    _, data, dirs = runs
    dense = save_run(tmp_path / 'dense-s1', {'ffn_type': 'dense', 'ffn_hidden': 64}, 1, data)
    code, _ = run_main([dirs[0], dense, '--out', str(tmp_path / 'o')], capsys)
    assert code.startswith('error: ') and 'is a dense run' in code and '\n' not in code
    assert not (tmp_path / 'o').exists()                   # refused before anything was analysed


def test_data_of_another_vocabulary_is_one_line(runs, tmp_path, capsys):
    _, data, _ = runs
    compact = save_run(tmp_path / 'compact-s1', DEEPSEEK, 1, data, gpt2_ids=list(range(64)))
    code, _ = run_main([compact, '--out', str(tmp_path / 'o')], capsys)
    assert code.startswith('error: ') and 'holds GPT-2 ids' in code and '64-token compact vocabulary' in code
    assert '\n' not in code
    big = random_token_data(tmp_path / 'big', 500, 2000)   # ids beyond the model's 64
    code, _ = run_main([str(runs[2][0]), '--data_dir', big, '--out', str(tmp_path / 'o')], capsys)
    assert code.startswith('error: ') and "outside" in code and 'vocabulary of 64' in code


def test_k_eval_pairs_find_the_fewest_experts_that_match_by_hand():
    def run(seed, losses, own):
        return {'seed': seed, 'result': {'top_k': len(losses), 'val_loss': own,
                                         'k_eval': [{'k': k + 1, 'val_loss': v} for k, v in enumerate(losses)]}}
    a = {'name': 'a', 'runs': [run(1, [3.5, 3.1, 3.0], 3.0), run(2, [3.7, 3.3, 3.2], 3.2)]}
    b = {'name': 'b', 'runs': [run(1, [3.4, 3.2], 3.2), run(2, [3.6, 3.3], 3.3)]}
    rows = ae.k_eval_pairs([a, b])
    ab = [r for r in rows if r['a'] == 'a']
    # a - b per k: k=1: (0.3, 0.4) -> 0.35; k=2: (-0.1, 0.0) -> -0.05 (the first <= 0); k=3: (-0.2, -0.1) -> -0.15
    assert [round(r['mean_diff'], 6) for r in ab] == [0.35, -0.05, -0.15]
    assert [r['matches'] for r in ab] == [False, True, False]
    assert ab[1]['method'] == 'paired' and ab[1]['ci95'][0] < -0.05 < ab[1]['ci95'][1]
    ba = [r for r in rows if r['a'] == 'b']       # b - a: k=1: (0.4, 0.4); k=2: (0.2, 0.1): never matches
    assert [round(r['mean_diff'], 6) for r in ba] == [0.4, 0.15] and not any(r['matches'] for r in ba)
