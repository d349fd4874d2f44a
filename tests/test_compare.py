"""compare.py on hand-written metrics.jsonl files (the schema train.py writes) and on two tiny real runs (the session's
shared ones); run inside this process, and once as a process of its own."""

import itertools
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, copy_run, run_script, subprocess_env as env
from compare import (FFN_SETTINGS, IGNORED_SETTINGS, MAXVIO_FLOOR, T_975, balancing_kind, count_label, curve_band,
                     differing_settings, group_runs, incomparable_settings, layer_mean, load_run, load_shares,
                     maxvio_spread, mean_interval, merge_per_iter, not_compared_text, pair_line, pair_stats,
                     pairs_table, read_metrics, run_numbers, seed_means, selection_counts, share_spread,
                     sign_agreement, split_looks, spread_labels, t_975, tradeoff_point, tradeoff_row, tradeoff_table,
                     uniform_maxvio, welch_difference)


def compare(*args, check=True) -> subprocess.CompletedProcess:
    """python compare.py ARGS, inside this process (test_default_finds_out_dirs_in_cwd starts it as a process)."""
    return run_script('compare.py', args, check=check)


def config_row(config_files: list[str] | None, total: int = 1000, active: int = 1000, **settings) -> dict:
    """A config row; settings override a few defaults of train.py (config_files None: an older run without them)."""
    config = {'seed': 1337, 'out_dir': 'out', 'ffn_type': 'dense', 'n_experts': 4, 'top_k': 2, 'learning_rate': 2e-3,
              'max_iters': 100, 'eval_interval': 50, 'log_interval': 10, 'compile': False, 'device': 'cpu', **settings}
    args = {'ffn_type': config['ffn_type'], 'ffn_hidden': 64, 'n_experts': config['n_experts'], 'top_k': config['top_k'],
            'n_shared_experts': 0}
    row = {'type': 'config', 'iter': 0, 'config': config, 'model_args': args, 'total_params': total,
           'active_params': active, 'tokens_per_iter': 512, 'world_size': 1, 'device': 'cpu', 'dtype': 'float32'}
    if config_files is not None:
        row['config_files'] = config_files
    return row


def eval_row(it: int, val_loss: float, **moe) -> dict:
    return {'type': 'eval', 'iter': it, 'tokens': it * 512, 'train_loss': val_loss + 0.1, 'val_loss': val_loss,
            'lr': 1e-3, 'elapsed_s': it / 10, 'tokens_per_s': 1000.0 if it else None, **moe}


def dense_rows(seed: int, losses: tuple[float, float], speeds=(100.0, 300.0, 200.0), config_files=None, **settings):
    """A dense run: evals at 0, 50, 100 (val losses[0] at 50, losses[1] at 100), train rows with speeds."""
    files = ['config/tinystories_cpu.py', 'config/dense.py'] if config_files is None else config_files
    return [config_row(files, seed=seed, out_dir=f'out-dense-{seed}', **settings),
            eval_row(0, 5.0),
            *[{'type': 'train', 'iter': 10 * (i + 1), 'tokens': 5120 * (i + 1), 'loss': 4.0, 'aux_loss': 0.0, 'lr': 1e-3,
               'ms_per_iter': 5.0, 'tokens_per_s': s} for i, s in enumerate(speeds)],
            eval_row(50, losses[0]), eval_row(100, losses[1])]


def moe_rows(config: str, seed: int, losses: tuple[float, float], maxvio_batch: list[float], maxvio_global: list[float],
             dropped: list[float], speeds=(100.0, 300.0, 200.0), **settings) -> list[dict]:
    """A MoE run with 2 layers of 4 experts, named by its config file; the given maxvio_batch, maxvio_global and
    dropped_frac are the last eval's; the eval at 50 has other values, which the table must not use."""
    rows = [config_row(['config/tinystories_cpu.py', f'config/{config}.py'], 2000, 1100, ffn_type=config, seed=seed,
                       out_dir=f'out-{config}-{seed}', **settings),
            eval_row(0, 5.0, maxvio_global=[2.0, 2.0], val_expert_counts=[[100, 0, 0, 0], [25, 25, 25, 25]])]
    rows += [{'type': 'train', 'iter': 10 * (i + 1), 'tokens': 5120 * (i + 1), 'loss': 4.0, 'aux_loss': 0.01, 'lr': 1e-3,
              'ms_per_iter': 5.0, 'tokens_per_s': s, 'maxvio_batch': [0.5, 0.5], 'dropped_frac': [0.2, 0.2]}
             for i, s in enumerate(speeds)]
    rows.append(eval_row(50, losses[0], maxvio_global=[9.0, 9.0], val_expert_counts=[[40, 20, 20, 20], [25, 25, 25, 25]],
                         expert_counts=[[40, 20, 20, 20], [25, 25, 25, 25]], maxvio_batch=[9.0, 9.0], dropped_frac=[0.9, 0.9]))
    rows.append(eval_row(100, losses[1], maxvio_global=maxvio_global, val_expert_counts=[[40, 20, 20, 20], [25, 25, 25, 25]],
                         expert_counts=[[40, 20, 20, 20], [25, 25, 25, 25]], maxvio_batch=maxvio_batch, dropped_frac=dropped))
    rows.append({'type': 'expert_selection', 'iter': 100, 'layers': [0, 1], 'tokens': 40,
                 'counts': [[10, 30, 0, 0], [5, 5, 5, 25]] if seed % 2 else [[20, 20, 0, 0], [5, 5, 25, 5]]})
    return rows


def write_run(path, rows, truncate_last: bool = False):
    path.mkdir(parents=True)
    text = ''.join(json.dumps(r) + '\n' for r in rows)
    if truncate_last:
        text = text[:-25]                              # a run killed while writing its last line
    (path / 'metrics.jsonl').write_text(text)


@pytest.fixture
def runs(tmp_path):
    """deepseek_moe (balanced as in config/deepseek_moe.py: bias updates and a sequence-wise loss) and moe (a Switch
    balance loss) with seeds 1, 2, 3 and one dense run (seed 1), written in that order."""
    for seed, losses, mb, mg, speeds in ((1, (2.98, 3.00), [0.2, 0.4], [1.0, 0.0], (100.0, 300.0, 200.0)),
                                         (2, (3.30, 3.10), [0.1, 0.3], [0.5, 0.5], (400.0, 500.0, 600.0)),
                                         (3, (3.25, 3.05), [0.4, 0.6], [0.2, 0.0], (250.0, 260.0, 270.0))):
        write_run(tmp_path / f'out-deepseek_moe-{seed}', moe_rows('deepseek_moe', seed, losses, mb, mg, [0.0, 0.0], speeds,
                                                                  bias_update_speed=0.001, seq_aux_coef=0.0001))
    for seed, final in ((1, 3.04), (2, 3.12), (3, 3.09)):
        write_run(tmp_path / f'out-moe-{seed}', moe_rows('moe', seed, (final + 0.2, final), [1.0, 1.0], [0.5, 0.5], [0.1, 0.0],
                                                         balance_loss_coef=0.01))
    write_run(tmp_path / 'out-dense', dense_rows(1, (3.0, 3.2)))
    return tmp_path


def run_dirs(root) -> list:
    return [root / f'out-deepseek_moe-{s}' for s in (1, 2, 3)] + [root / f'out-moe-{s}' for s in (1, 2, 3)] + [root / 'out-dense']


# -----------------------------------------------------------------------------
# pure functions, by hand


def test_pure_metric_functions():
    shares = load_shares([[10, 30, 0, 0], [5, 5, 5, 25]])
    assert shares == [[0.25, 0.75, 0.0, 0.0], [0.125, 0.125, 0.125, 0.625]]
    assert load_shares([[0, 0], [1, 3]]) == [[0.0, 0.0], [0.25, 0.75]]      # a layer that received nothing
    assert layer_mean([0.6, 0.0]) == pytest.approx(0.3)
    assert layer_mean(None) is None and layer_mean([]) is None
    # three runs of 2 layers; run 3 routed only 4 token-slots per layer, so the mean of the runs' shares differs
    # from the shares of the pooled counts (layer 0, expert 0: 31/84 = 0.369) and from their median (0.25)
    #   shares, layer 0: (0.25, 0.75, 0, 0), (0.5, 0.5, 0, 0), (0.25, 0, 0, 0.75)
    #           layer 1: (0.125, 0.125, 0.125, 0.625), (0.25, 0.25, 0.25, 0.25), (0, 0, 0.5, 0.5)
    mean, low, high = share_spread([[[10, 30, 0, 0], [5, 5, 5, 25]], [[20, 20, 0, 0], [10, 10, 10, 10]],
                                    [[1, 0, 0, 3], [0, 0, 2, 2]]])
    np.testing.assert_allclose(mean, [[1 / 3, 1.25 / 3, 0.0, 0.25], [0.125, 0.125, 0.875 / 3, 1.375 / 3]])
    np.testing.assert_allclose(low, [[0.25, 0.0, 0.0, 0.0], [0.0, 0.0, 0.125, 0.25]])
    np.testing.assert_allclose(high, [[0.5, 0.75, 0.0, 0.75], [0.25, 0.25, 0.5, 0.625]])
    # the band is taken where every curve has a point: x = 0 and 10 (x = 20 and 30 only in one); at x = 10 the
    # values 2, 4, 9 have mean 5 (median 4)
    xs, mean, low, high = curve_band([[(0, 1.0), (10, 2.0), (20, 3.0)], [(0, 3.0), (10, 4.0)], [(0, 2.0), (10, 9.0), (30, 1.0)]])
    assert xs == [0, 10] and mean.tolist() == [2.0, 5.0] and low.tolist() == [1.0, 2.0] and high.tolist() == [3.0, 9.0]


def test_uniform_maxvio_by_hand():
    # two experts, top-1: load_0 ~ Binomial(T, 1/2) and MaxVio = |2 load_0 / T - 1|, whose mean tends to
    # sqrt(2 / (pi T)) (the mean absolute deviation of its normal limit, sd 1 / sqrt(T))
    T = 4000
    assert uniform_maxvio(2, 1, T, trials=2000) == pytest.approx(math.sqrt(2 / (math.pi * T)), rel=0.06)
    assert uniform_maxvio(8, 8, 100) == 0.0        # top_k distinct experts: with k = E every load is equal
    # more experts, more imbalance from sampling alone; more tokens, less
    assert uniform_maxvio(32, 8, 2048) > uniform_maxvio(8, 2, 2048) > uniform_maxvio(8, 2, 20480) > 0


def test_balancing_kind():
    assert balancing_kind({'bias_update_speed': 0.001, 'seq_aux_coef': 0.0001}) == 'both'     # config/deepseek_moe.py
    assert balancing_kind({'bias_update_speed': 0.001, 'seq_aux_coef': 0.0, 'aux_loss_coef': 0.0}) == 'loss-free'
    assert balancing_kind({'balance_loss_coef': 0.01, 'z_loss_coef': 0.001}) == 'auxiliary loss'   # config/moe.py
    assert balancing_kind({'aux_loss_coef': 0.01, 'bias_update_speed': 0.0}) == 'auxiliary loss'
    assert balancing_kind({'seq_aux_coef': 0.0001}) == 'auxiliary loss'
    assert balancing_kind({'z_loss_coef': 0.001}) == 'none'          # the router z-loss does not balance
    assert balancing_kind({}) == 'none' and balancing_kind({'bias_update_speed': None}) == 'none'   # older runs


def test_spread_labels_moves_overlapping_labels_up_by_hand():
    # two labels of width 2 and height 1 at the same place: the second (the higher anchor, placed second) goes on top
    assert spread_labels([(0.0, 0.0), (0.5, 0.2)], [2.0, 2.0], 1.0) == [0.0, 1.0]
    # apart in x: neither moves, whatever their heights
    assert spread_labels([(0.0, 0.0), (3.0, 0.2)], [2.0, 2.0], 1.0) == [0.0, 0.2]
    # apart in y by a full height: neither moves
    assert spread_labels([(0.0, 0.0), (0.0, 1.0)], [1.0, 1.0], 1.0) == [0.0, 1.0]
    # three in a stack, given out of order: placed from the lowest anchor, each one height above the last
    assert spread_labels([(0.0, 0.3), (0.0, 0.0), (0.1, 0.1)], [1.0, 1.0, 1.0], 0.5) == [1.0, 0.0, 0.5]
    # the last label clears the two it meets at its anchor (0 and 0.5), lands on the third (1.0) and clears it too
    assert spread_labels([(0.0, 0.0), (0.0, 0.1), (0.0, 0.2), (0.5, 0.25)], [1.0] * 4, 0.5) == [0.0, 0.5, 1.0, 1.5]


def test_tradeoff_numbers_by_hand():
    # final val losses (3.00, 3.10, 3.05): mean 3.05, sd 0.05, half-width t_{0.975, 2} * 0.05 / sqrt(3) = 0.1242
    assert mean_interval([3.00, 3.10, 3.05]) == pytest.approx((3.05, 4.303 * 0.05 / math.sqrt(3)))
    assert mean_interval([1.0, 2.0]) == pytest.approx((1.5, 12.706 * 0.5))     # sd sqrt(0.5), se sqrt(0.5 / 2) = 0.5
    assert mean_interval([3.2]) == (3.2, None)
    summary = {'label': 'x (3 seeds)', 'name': 'x', 'n_runs': 3, 'final_val_loss_runs': [3.00, 3.10, 3.05],
               'final_maxvio_global_runs': [0.5, 0.0, 0.1], 'final_maxvio_batch_runs': [None, None, None],
               'uniform_maxvio_global': 0.03, 'uniform_maxvio_batch': 0.09}
    half = 4.303 * 0.05 / math.sqrt(3)
    row = tradeoff_row(summary, 'loss-free')
    assert row['final_val_loss_ci95'] == pytest.approx([3.05 - half, 3.05 + half])     # (approx of a dict: flat only)
    assert {k: v for k, v in row.items() if k != 'final_val_loss_ci95'} == pytest.approx({
        'group': 'x (3 seeds)', 'name': 'x', 'kind': 'loss-free', 'n_runs': 3, 'final_val_loss_mean': 3.05,
        'final_val_loss_half_width': half,
        'final_maxvio_global_mean': 0.2, 'final_maxvio_global_min': 0.0, 'final_maxvio_global_max': 0.5,
        'uniform_maxvio_global': 0.03, 'final_maxvio_batch_mean': None, 'final_maxvio_batch_min': None,
        'final_maxvio_batch_max': None, 'uniform_maxvio_batch': 0.09})
    # on the log axis MaxVio 0 (the min here) is drawn at MAXVIO_FLOOR; no maxvio_batch logged: no point
    x, (left, right), y, yerr = tradeoff_point(row, 'maxvio_global')
    assert (x, left, right, y, yerr) == pytest.approx((0.2, 0.2 - MAXVIO_FLOOR, 0.3, 3.05, half))
    assert tradeoff_point(row, 'maxvio_batch') is None
    assert maxvio_spread(row, 'maxvio_global') == '0.200 (0.000-0.500); random 0.030'
    assert maxvio_spread(row, 'maxvio_batch') == '-'
    one = tradeoff_row({**summary, 'n_runs': 1, 'final_val_loss_runs': [3.2], 'final_maxvio_global_runs': [0.4],
                        'uniform_maxvio_global': None}, 'none')
    assert one['final_val_loss_half_width'] is None and one['final_val_loss_ci95'] is None
    assert tradeoff_point(one, 'maxvio_global') == (0.4, (0.0, 0.0), 3.2, None)     # one run: no bars
    assert maxvio_spread(one, 'maxvio_global') == '0.400'
    assert tradeoff_table([row, one]).splitlines()[2:4] == [
        '| x (3 seeds) | loss-free | 3 | 3.0500 [2.9258, 3.1742] | 0.200 (0.000-0.500); random 0.030 | - |',
        '| x (3 seeds) | none | 1 | 3.2000 | 0.400 | - |']


def student_t_cdf(t: float, df: int) -> float:
    """P(T <= t) for t >= 0, by Simpson's rule on the density of Student's t (an independent check of the table)."""
    x = np.linspace(0.0, t, 20001)
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    y = c * (1 + x ** 2 / df) ** (-(df + 1) / 2)
    return 0.5 + (x[1] - x[0]) / 3 * (y[0] + y[-1] + 4 * y[1:-1:2].sum() + 2 * y[2:-1:2].sum())


def test_t_quantiles():
    for df, t in ((1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042), (40, 2.021), (60, 2.000), (120, 1.980)):
        assert t_975(df) == pytest.approx(t, abs=6e-4), df
    assert len(T_975) == 30
    for df in list(range(1, 31)) + [31, 35, 45, 80, 200, 1000]:       # table (3 decimals) and the rule beyond it
        assert student_t_cdf(t_975(df), df) == pytest.approx(0.975, abs=3e-5), df
    assert t_975(10 ** 6) == pytest.approx(1.959964, abs=1e-5)          # the normal quantile
    with pytest.raises(ValueError, match='>= 1'):
        t_975(0)


def test_paired_interval_and_sign_count_by_hand():
    # seeds 1..3 in both groups (seed 4 only in a: left out); d = a - b = (-0.04, -0.02, -0.04)
    a = [(1, 3.00), (2, 3.10), (3, 3.05), (4, 2.00)]
    b = [(1, 3.04), (2, 3.12), (3, 3.09)]
    p = pair_stats(a, b)
    # mean -0.1/3; sum of squared deviations 0.0036 - 3 * (0.1/3)^2 = 0.0008/3, var = 0.0004/3, se = 0.02/3
    assert p['method'] == 'paired' and p['n_seeds'] == 3 and p['df'] == 2
    assert p['mean_diff'] == pytest.approx(-0.1 / 3)
    assert p['half_width'] == pytest.approx(4.303 * 0.02 / 3)                    # 0.0287
    assert p['ci95'] == pytest.approx([-0.1 / 3 - 4.303 * 0.02 / 3, -0.1 / 3 + 4.303 * 0.02 / 3])
    assert p['seeds_agree'] == 3 and p['paired_seeds'] == [1, 2, 3] and not p['all_paired']
    # seed 4 has no partner: the difference is over seeds 1-3, not that of the group means (2.7875 - 3.0833)
    assert pair_line('deepseek_moe', 'moe', p) == ('deepseek_moe - moe: -0.033 +- 0.029 '
                                                  '(3/3 seeds lower; paired on seeds 1, 2, 3)')
    assert pair_line('x', 'y', pair_stats(a[:3], b)) == 'x - y: -0.033 +- 0.029 (3/3 seeds lower)'
    rows = [{**p, 'a_name': 'x', 'b_name': 'y'}, {**pair_stats(a[:3], b), 'a_name': 'x', 'b_name': 'y'}]
    assert pairs_table(rows).splitlines()[2:] == [
        '| x - y | -0.033 | [-0.062, -0.005] (± 0.029) | 3/3 lower (paired on seeds 1, 2, 3) |',
        '| x - y | -0.033 | [-0.062, -0.005] (± 0.029) | 3/3 lower (paired by seed) |']
    # seed 3 now disagrees: d = (-0.04, -0.02, +0.02), mean -0.04/3; squares 0.0024 - 3 * (0.04/3)^2 = 0.0056/3,
    # var 0.0028/3, se = sqrt(0.0028)/3
    p = pair_stats(a, [(1, 3.04), (2, 3.12), (3, 3.03)])
    assert p['mean_diff'] == pytest.approx(-0.04 / 3)
    assert p['half_width'] == pytest.approx(4.303 * math.sqrt(0.0028) / 3)     # 0.0759
    assert p['seeds_agree'] == 2
    assert pair_line('a', 'b', p) == 'a - b: -0.013 +- 0.076 (2/3 seeds lower; paired on seeds 1, 2, 3)'
    # two runs of one seed count as their mean; a run of unknown seed pairs with nothing
    assert seed_means([(1, 3.0), (1, 3.2), (None, 9.0), (2, 3.1)]) == pytest.approx({1: 3.1, 2: 3.1})
    assert sign_agreement([0.0, 0.1, -0.1], 0.0) == 1 and sign_agreement([0.1, 0.2, -0.1], 0.2 / 3) == 2
    # the other way round: higher
    assert pair_line('b', 'a', pair_stats([(1, 3.04), (2, 3.12), (3, 3.03)], a[:3])) == 'b - a: 0.013 +- 0.076 (2/3 seeds higher)'


def test_welch_and_single_run_by_hand():
    # a = (3.0, 3.2): mean 3.1, s^2 = 0.02, v_a = 0.01; b = (2.8, 2.9, 3.3): mean 3.0, s^2 = 0.14/2 = 0.07, v_b = 0.07/3
    # df = (0.01 + 0.07/3)^2 / (0.01^2 / 1 + (0.07/3)^2 / 2) = 2.985 -> t at df 2 = 4.303
    v = 0.01 + 0.07 / 3
    diff, half, df = welch_difference([3.0, 3.2], [2.8, 2.9, 3.3])
    assert diff == pytest.approx(0.1)
    assert df == pytest.approx(v ** 2 / (0.01 ** 2 + (0.07 / 3) ** 2 / 2)) and df == pytest.approx(2.98507, abs=1e-5)
    assert half == pytest.approx(4.303 * math.sqrt(v))                          # 0.7856
    assert welch_difference([1.0, 1.0], [2.0, 2.0, 2.0]) == (-1.0, 0.0, 3.0)     # no spread: a point, df n_a + n_b - 2
    # only one shared seed (1): unpaired
    p = pair_stats([(1, 3.0), (2, 3.2)], [(1, 2.8), (6, 2.9), (7, 3.3)])
    assert p['method'] == 'welch' and p['seeds_agree'] is None and p['half_width'] == pytest.approx(half)
    assert pair_line('x', 'y', p) == 'x - y: 0.100 +- 0.786 (unpaired, Welch df 2.99)'
    # a group of one run: the difference of the means, no interval
    p = pair_stats([(1, 3.0)], [(1, 3.2), (2, 3.4)])
    assert p['method'] == 'means' and p['mean_diff'] == pytest.approx(-0.3)
    assert p['half_width'] is None and p['ci95'] is None and p['seeds_agree'] is None
    assert pair_line('x', 'y', p) == 'x - y: -0.300 (a group of one run: no interval)'


def test_grouping(tmp_path):
    # two seeds of deepseek_moe (differing also in out_dir, log_interval, compile), one moe, one moe with another
    # learning rate; then an older dense run without config_files and a moe run with a setting the others lack
    rows = {'ds1': moe_rows('deepseek_moe', 1, (3.2, 3.0), [0.1, 0.1], [0.1, 0.1], [0.0, 0.0]),
            'moe': moe_rows('moe', 1, (3.2, 3.0), [0.1, 0.1], [0.1, 0.1], [0.0, 0.0]),
            'ds2': moe_rows('deepseek_moe', 2, (3.2, 3.0), [0.1, 0.1], [0.1, 0.1], [0.0, 0.0], log_interval=5, compile=True),
            'moe_lr': moe_rows('moe', 1, (3.2, 3.0), [0.1, 0.1], [0.1, 0.1], [0.0, 0.0], learning_rate=4e-3),
            'old': dense_rows(1, (3.0, 3.2)),
            'moe_z': moe_rows('moe', 2, (3.2, 3.0), [0.1, 0.1], [0.1, 0.1], [0.0, 0.0], z_loss_coef=0.001)}
    del rows['old'][0]['config_files']
    for name, r in rows.items():
        write_run(tmp_path / name, r)
    runs = {name: load_run(str(tmp_path / name)) for name in rows}
    groups = group_runs([runs[name] for name in ('ds1', 'moe', 'ds2', 'moe_lr')])
    assert [g['label'] for g in groups] == ['deepseek_moe (2 seeds)', 'moe [learning_rate=0.002] (1 run)',
                                           'moe [learning_rate=0.004] (1 run)']
    assert [[os.path.basename(r['dir']) for r in g['runs']] for g in groups] == [['ds1', 'ds2'], ['moe'], ['moe_lr']]
    assert groups[0]['name'] == 'deepseek_moe' and groups[1]['name'] == 'moe [learning_rate=0.002]'
    groups = group_runs(list(runs.values()))
    assert [g['label'] for g in groups] == [
        'deepseek_moe (2 seeds)',
        'moe [learning_rate=0.002, z_loss_coef=0.0] (1 run)',      # a setting a run lacks: train.py's default
        'moe [learning_rate=0.004, z_loss_coef=0.0] (1 run)',
        'dense 64 (1 run)',                                     # no config_files: described by its model
        'moe [learning_rate=0.002, z_loss_coef=0.001] (1 run)']
    assert differing_settings([{'seed': 1, 'out_dir': 'a', 'lr': 1}, {'seed': 2, 'lr': 1.0, 'dropout': 0.1}]) == ['dropout']
    # a run older than a setting ran with its default: it groups with a newer run that logs the default
    newer = moe_rows('moe', 2, (3.2, 3.0), [0.1, 0.1], [0.1, 0.1], [0.0, 0.0], bias_update_rule='sign')
    write_run(tmp_path / 'newer', newer)
    assert len(group_runs([runs['moe'], load_run(str(tmp_path / 'newer'))])) == 1
    # a run resumed without its config files (python train.py --init_from=resume --out_dir=...) keeps its label
    resumed = moe_rows('deepseek_moe', 3, (3.2, 3.0), [0.1, 0.1], [0.1, 0.1], [0.0, 0.0])
    write_run(tmp_path / 'resumed', resumed[:2] + [{**resumed[0], 'iter': 50, 'config_files': []}] + resumed[2:])
    assert load_run(str(tmp_path / 'resumed'))['label'] == 'deepseek_moe'
    # a run killed at step 20, after its checkpoint at step 0, and resumed logs steps 10 and 20 twice: the
    # resumed rows count, once each (median tokens/s 200 of 100, 300, 200; with the lost rows it would be 900)
    lost = [{**r, 'tokens_per_s': 900.0} for r in resumed if r['type'] == 'train' and r['iter'] <= 20]
    write_run(tmp_path / 'killed', resumed[:2] + lost + [{**resumed[0], 'config_files': []}] + resumed[1:])
    killed = load_run(str(tmp_path / 'killed'))
    assert [r['iter'] for r in killed['train']] == [10, 20, 30] and [r['iter'] for r in killed['evals']] == [0, 50, 100]
    assert run_numbers(killed)['tokens_per_s'] == 200.0
    # the dtype a run really used counts: 'auto' is bfloat16 on a GPU and float32 on the CPU
    gpu = moe_rows('deepseek_moe', 3, (3.2, 3.0), [0.1, 0.1], [0.1, 0.1], [0.0, 0.0])
    gpu[0]['dtype'] = 'bfloat16'
    write_run(tmp_path / 'gpu', gpu)
    groups = group_runs([runs['ds1'], runs['ds2'], load_run(str(tmp_path / 'gpu'))])
    assert [g['label'] for g in groups] == ['deepseek_moe [dtype=float32] (2 seeds)', 'deepseek_moe [dtype=bfloat16] (1 run)']
    assert count_label([1]) == '1 run' and count_label([1, 2, 3]) == '3 seeds' and count_label([1, 1]) == '2 runs'
    assert count_label([1, None]) == '2 runs'


def look_rows(run: list[dict], flagged: bool) -> list[dict]:
    """The rows an eval_only look (python train.py --init_from=resume --out_dir=X --eval_only=True) appends to
    a finished run: a config row with eval_only True (here also given a config file and another eval_iters,
    which must not relabel or regroup the run) and an eval row at the last iteration, after no training steps,
    so without maxvio_batch, dropped_frac and expert_counts. flagged: the eval row says "eval_only": true, as
    train.py writes from now on (older runs lack the key)."""
    cfg = run[0]
    look_cfg = {**cfg, 'iter': 100, 'config_files': ['config/tinystories_cpu.py', 'config/look.py'],
                'config': {**cfg['config'], 'eval_only': True, 'init_from': 'resume', 'eval_iters': 200}}
    look_eval = eval_row(100, 2.5, maxvio_global=[0.05, 0.05], val_expert_counts=[[26, 25, 25, 24], [25, 25, 25, 25]])
    return [look_cfg, {**look_eval, 'eval_only': True} if flagged else look_eval]


def test_split_looks():
    own_cfg, look_cfg = {'type': 'config', 'config': {'eval_only': False}}, {'type': 'config', 'config': {'eval_only': True}}
    e50, e100, look, flagged = ({'type': 'eval', 'iter': 50}, {'type': 'eval', 'iter': 100},
                                {'type': 'eval', 'iter': 100}, {'type': 'eval', 'iter': 100, 'eval_only': True})
    # an older look is known by its config row; a newer one also by its flag; a later resume is the run's own again
    t110 = {'type': 'train', 'iter': 110}
    own, looks = split_looks([own_cfg, e50, e100, look_cfg, look, own_cfg, t110])
    assert own == [own_cfg, e50, e100, own_cfg, t110] and looks == [look_cfg, look]
    own, looks = split_looks([own_cfg, e50, e100, flagged])
    assert own == [own_cfg, e50, e100] and looks == [flagged]
    assert split_looks([{'type': 'eval', 'iter': 0}]) == ([{'type': 'eval', 'iter': 0}], [])   # no config row: own


@pytest.mark.parametrize('flagged', [False, True])
def test_eval_only_look_changes_nothing(tmp_path, flagged):
    seed1 = moe_rows('moe', 1, (3.2, 3.0), [0.3, 0.1], [0.4, 0.2], [0.1, 0.3])
    write_run(tmp_path / 'looked', seed1 + look_rows(seed1, flagged))
    write_run(tmp_path / 'seed2', moe_rows('moe', 2, (3.3, 3.1), [0.1, 0.1], [0.1, 0.1], [0.0, 0.0]))
    run = load_run(str(tmp_path / 'looked'))
    assert [r['iter'] for r in run['evals']] == [0, 50, 100]
    assert 'eval_only' not in run['evals'][-1] and run['evals'][-1]['val_loss'] == 3.0
    # the run's own final eval: val loss 3.0 (the look's 2.5), maxvio_batch 0.2 (not the eval at 50's 9.0),
    # maxvio_global 0.3 (the look's 0.05), dropped 0.2
    numbers = run_numbers(run)
    assert numbers['final_val_loss'] == 3.0 and numbers['final_iter'] == 100 and numbers['best_val_loss'] == 3.0
    assert numbers['maxvio_batch'] == pytest.approx(0.2) and numbers['maxvio_global'] == pytest.approx(0.3)
    assert numbers['dropped_share'] == pytest.approx(0.2)
    # label and settings are the run's: one group with seed 2, named by the run's config file
    assert run['label'] == 'moe' and not run['config']['config'].get('eval_only')
    assert [g['label'] for g in group_runs([run, load_run(str(tmp_path / 'seed2'))])] == ['moe (2 seeds)']
    # a directory holding nothing but a look is no run
    write_run(tmp_path / 'only-look', look_rows(seed1, flagged))
    assert load_run(str(tmp_path / 'only-look')) is None


def test_rows_of_one_iteration_merge():
    # a run killed after writing its eval at 100 and resumed from an earlier checkpoint writes the eval at 100
    # again; the later row's values win, keys it lacks (here dropped_frac) keep the earlier row's values
    first = eval_row(100, 3.1, maxvio_batch=[0.5, 0.5], dropped_frac=[0.2, 0.4])
    again = eval_row(100, 3.0, maxvio_batch=[0.1, 0.3])
    rows = merge_per_iter([eval_row(0, 5.0), eval_row(50, 3.5, dropped_frac=[0.9, 0.9]), first, again])
    assert [r['iter'] for r in rows] == [0, 50, 100]
    assert rows[2] == {**first, 'val_loss': 3.0, 'train_loss': 3.1, 'maxvio_batch': [0.1, 0.3]}
    assert merge_per_iter([again, eval_row(0, 5.0)]) == [eval_row(0, 5.0), again]      # in iteration order
    numbers = run_numbers({'evals': rows, 'train': []})
    assert numbers['final_val_loss'] == 3.0 and numbers['maxvio_batch'] == pytest.approx(0.2)
    assert numbers['dropped_share'] == pytest.approx(0.3)                               # not the eval at 50's 0.9


def test_comparable_settings():
    cpu = {'seed': 1, 'device': 'cpu', 'ffn_type': 'deepseek_moe', 'n_experts': 30, 'bias_update_speed': 0.001,
           'max_iters': 40, 'n_embd': 128, 'dataset': 'tinystories', 'dtype': 'float32'}
    # the FFN's own settings and IGNORED_SETTINGS may differ: comparable
    moe = {**cpu, 'seed': 2, 'device': 'cuda', 'compile': True, 'ffn_type': 'moe', 'n_experts': 8, 'bias_update_speed': 0.0,
           'balance_loss_coef': 0.01, 'bias_update_rule': 'proportional', 'routing': 'expert_choice'}
    assert incomparable_settings(cpu, moe) == []
    gpu = {**moe, 'max_iters': 4, 'n_embd': 384}
    assert incomparable_settings(cpu, gpu) == ['max_iters', 'n_embd']
    assert incomparable_settings(cpu, {**cpu, 'dtype': 'bfloat16', 'learning_rate': 0.002}) == ['dtype', 'learning_rate']
    assert not_compared_text('deepseek_moe', 'moe', cpu, gpu, ['max_iters', 'n_embd']) == (
        'deepseek_moe and moe differ in max_iters (40 vs 4), n_embd (128 vs 384): not compared')
    assert not_compared_text('a', 'b', cpu, {}, ['dataset']) == 'a and b differ in dataset (tinystories vs None): not compared'
    # every FFN setting is one of train.py's (a misspelt name would make groups that differ in that setting
    # incomparable), the balancing and routing ones included
    from train import DEFAULTS
    assert set(FFN_SETTINGS) <= set(DEFAULTS)
    assert {'bias_update_rule', 'bias_update_schedule', 'bias_recenter', 'routing', 'expert_choice_group'} <= set(FFN_SETTINGS)
    assert not set(FFN_SETTINGS) & set(IGNORED_SETTINGS) and 'moe_dispatch' in IGNORED_SETTINGS
    # the study's FFN configs change only FFN settings (and out_dir): every two of them are comparable, at either size
    from configurator import configure
    ffn_configs = sorted(f for f in os.listdir(os.path.join(REPO, 'config')) if not f.startswith('tinystories_cpu'))   # not the size overlays
    assert {'dense.py', 'moe.py', 'deepseek_moe.py'} <= set(ffn_configs)
    for size in ([], [os.path.join(REPO, 'config', 'tinystories_cpu.py')], [os.path.join(REPO, 'config', 'tinystories_cpu_gpt2.py')]):
        settings = {f: configure(DEFAULTS, size + [os.path.join(REPO, 'config', f)]) for f in ffn_configs}
        for a, b in itertools.combinations(ffn_configs, 2):
            assert incomparable_settings(settings[a], settings[b]) == [], (a, b)


# -----------------------------------------------------------------------------
# the script


def test_figures_table_and_summary_json(runs):
    out = runs / 'cmp'
    p = compare(*run_dirs(runs), '--out', out)
    for name in ('val_loss.png', 'expert_selection.png', 'maxvio.png', 'tradeoff.png'):
        assert (out / name).stat().st_size > 10_000, name
    summary = json.loads((out / 'summary.json').read_text())
    ds, moe, dense = summary['groups']
    assert [g['label'] for g in summary['groups']] == ['deepseek_moe (3 seeds)', 'moe (3 seeds)', 'dense (1 run)']
    assert ds['runs'] == [str(d) for d in run_dirs(runs)[:3]] and ds['seeds'] == [1, 2, 3]
    # deepseek_moe: final (3.00, 3.10, 3.05): mean 3.05, sd 0.05; best (2.98, 3.10, 3.05)
    assert ds['final_val_loss_mean'] == pytest.approx(3.05) and ds['final_val_loss_std'] == pytest.approx(0.05)
    assert ds['best_val_loss_mean'] == pytest.approx((2.98 + 3.10 + 3.05) / 3)
    # tokens/s: run medians 200, 500, 260 -> 260; last evals' maxvio_batch (0.3, 0.2, 0.5), maxvio_global (0.5, 0.5, 0.1)
    assert ds['tokens_per_s'] == 260
    assert ds['final_maxvio_batch'] == pytest.approx(1.0 / 3) and ds['final_maxvio_global'] == pytest.approx(1.1 / 3)
    assert ds['dropped_share'] == 0.0 and moe['dropped_share'] == pytest.approx(0.05)
    assert moe['final_val_loss_std'] == pytest.approx(math.sqrt((0.13 ** 2 + 0.11 ** 2 + 0.02 ** 2) / 9 / 2))
    assert dense['final_val_loss_std'] is None and dense['final_maxvio_batch'] is None and dense['n_runs'] == 1
    assert summary['not_compared'] == [] and 'not compared' not in p.stderr and 'Not compared' not in (out / 'summary.md').read_text()
    pairs = {(q['a'], q['b']): q for q in summary['pairs']}
    assert list(pairs) == [('deepseek_moe (3 seeds)', 'moe (3 seeds)'), ('deepseek_moe (3 seeds)', 'dense (1 run)'),
                           ('moe (3 seeds)', 'dense (1 run)')]
    paired = pairs['deepseek_moe (3 seeds)', 'moe (3 seeds)']
    assert paired['mean_diff'] == pytest.approx(-0.1 / 3) and paired['half_width'] == pytest.approx(4.303 * 0.02 / 3)
    assert paired['seeds_agree'] == 3 and paired['n_seeds'] == 3 and paired['all_paired']
    assert paired['ci95'] == pytest.approx([-0.1 / 3 - 4.303 * 0.02 / 3, -0.1 / 3 + 4.303 * 0.02 / 3])
    single = pairs['deepseek_moe (3 seeds)', 'dense (1 run)']
    assert single['mean_diff'] == pytest.approx(-0.15) and single['ci95'] is None

    # the balance trade-off of the two MoE groups (not dense): deepseek_moe's final losses as in
    # test_tradeoff_numbers_by_hand; moe's (3.04, 3.12, 3.09): mean 3.0833, squared deviations
    # (0.13^2 + 0.11^2 + 0.02^2) / 9 = 0.0294 / 9, sd = sqrt(0.0294 / 18)
    ds_trade, moe_trade = summary['tradeoff']
    half = 4.303 * 0.05 / math.sqrt(3)
    assert ds_trade.pop('final_val_loss_ci95') == pytest.approx([3.05 - half, 3.05 + half])
    assert ds_trade == pytest.approx({
        'group': 'deepseek_moe (3 seeds)', 'name': 'deepseek_moe', 'kind': 'both', 'n_runs': 3, 'final_val_loss_mean': 3.05,
        'final_val_loss_half_width': half,
        'final_maxvio_global_mean': 1.1 / 3, 'final_maxvio_global_min': 0.1, 'final_maxvio_global_max': 0.5,
        'uniform_maxvio_global': uniform_maxvio(4, 2, 50), 'final_maxvio_batch_mean': 1.0 / 3,
        'final_maxvio_batch_min': 0.2, 'final_maxvio_batch_max': 0.5, 'uniform_maxvio_batch': uniform_maxvio(4, 2, 512)})
    assert moe_trade['kind'] == 'auxiliary loss' and moe_trade['final_val_loss_mean'] == pytest.approx(9.25 / 3)
    assert moe_trade['final_val_loss_half_width'] == pytest.approx(4.303 * math.sqrt(0.0294 / 18) / math.sqrt(3))
    assert (moe_trade['final_maxvio_batch_min'], moe_trade['final_maxvio_batch_max']) == (1.0, 1.0)
    assert ds['final_maxvio_global_runs'] == pytest.approx([0.5, 0.5, 0.1]) and dense['final_maxvio_global_runs'] == [None]

    md = (out / 'summary.md').read_text()
    lines = md.splitlines()
    assert next(x for x in lines if x.startswith('| deepseek_moe (3 seeds) | both')) == (
        f'| deepseek_moe (3 seeds) | both | 3 | 3.0500 [2.9258, 3.1742] | 0.367 (0.100-0.500); random '
        f'{uniform_maxvio(4, 2, 50):.3f} | 0.333 (0.200-0.500); random {uniform_maxvio(4, 2, 512):.3f} |')
    assert '\n\nBalance trade-off:\n\n' in md and 'Balance trade-off:' in p.stdout
    # random routing's MaxVio for 4 experts, top-2: 512 tokens a step; 100 validation slots = 50 tokens
    assert ds['uniform_maxvio_batch'] == uniform_maxvio(4, 2, 512) and ds['uniform_maxvio_global'] == uniform_maxvio(4, 2, 50)
    assert dense['uniform_maxvio_batch'] is None and dense['uniform_maxvio_global'] is None
    assert next(x for x in lines if x.startswith('| deepseek_moe (3 seeds)')) == (
        '| deepseek_moe (3 seeds) | 3 | deepseek_moe | 0.00M | 0.00M | 3.0433 ± 0.0603 | 3.0500 ± 0.0500 (100) | 260 | '
        f'0.333 ({uniform_maxvio(4, 2, 512):.3f}) | 0.367 ({uniform_maxvio(4, 2, 50):.3f}) | 0.00% |')
    assert next(x for x in lines if x.startswith('| dense (1 run)')) == (
        '| dense (1 run) | 1 | dense | 0.00M | 0.00M | 3.0000 | 3.2000 (100) | 200 | - | - | - |')
    assert '| deepseek_moe - moe | -0.033 | [-0.062, -0.005] (± 0.029) | 3/3 lower (paired by seed) |' in lines
    assert '| deepseek_moe - dense | -0.150 | - | a group of one run |' in lines
    # moe: dropped shares (0.1, 0.0) per layer -> 0.05 per run, in percent
    assert next(x for x in lines if x.startswith('| moe (3 seeds)')) == (
        '| moe (3 seeds) | 3 | moe | 0.00M | 0.00M | 3.0833 ± 0.0404 | 3.0833 ± 0.0404 (100) | 200 | '
        f'1.000 ({uniform_maxvio(4, 2, 512):.3f}) | 0.500 ({uniform_maxvio(4, 2, 50):.3f}) | 5.00% |')
    assert md.split('\n\nDifferences')[0] in p.stdout
    assert 'deepseek_moe - moe: -0.033 +- 0.029 (3/3 seeds lower)' in p.stdout.splitlines()
    assert 'moe - dense: -0.117 (a group of one run: no interval)' in p.stdout.splitlines()


def test_groups_that_are_not_comparable(tmp_path):
    # deepseek_moe and dense at the CPU size (40 iterations, 128 wide), moe at a GPU size (4 iterations, 384 wide)
    cpu, gpu = {'max_iters': 40, 'n_embd': 128}, {'max_iters': 4, 'n_embd': 384}
    write_run(tmp_path / 'out-deepseek_moe', moe_rows('deepseek_moe', 1, (3.2, 3.0), [0.1, 0.1], [0.1, 0.1], [0.0, 0.0], **cpu))
    write_run(tmp_path / 'out-moe', moe_rows('moe', 1, (3.2, 3.1), [0.1, 0.1], [0.1, 0.1], [0.0, 0.0], **gpu))
    write_run(tmp_path / 'out-dense', dense_rows(1, (3.0, 3.2), **cpu))
    out = tmp_path / 'cmp'
    p = compare(tmp_path / 'out-deepseek_moe', tmp_path / 'out-moe', tmp_path / 'out-dense', '--out', out)
    assert [x for x in p.stderr.splitlines() if x.startswith('warning:')] == [
        'warning: deepseek_moe and moe differ in max_iters (40 vs 4), n_embd (128 vs 384): not compared',
        'warning: moe and dense differ in max_iters (4 vs 40), n_embd (384 vs 128): not compared']
    summary = json.loads((out / 'summary.json').read_text())
    assert [(q['a_name'], q['b_name']) for q in summary['pairs']] == [('deepseek_moe', 'dense')]
    assert summary['pairs'][0]['mean_diff'] == pytest.approx(-0.2)
    assert summary['not_compared'] == [
        {'a': 'deepseek_moe (1 run)', 'b': 'moe (1 run)', 'a_name': 'deepseek_moe', 'b_name': 'moe',
         'differ': {'max_iters': [40, 4], 'n_embd': [128, 384]},
         'text': 'deepseek_moe and moe differ in max_iters (40 vs 4), n_embd (128 vs 384): not compared'},
        {'a': 'moe (1 run)', 'b': 'dense (1 run)', 'a_name': 'moe', 'b_name': 'dense',
         'differ': {'max_iters': [4, 40], 'n_embd': [384, 128]},
         'text': 'moe and dense differ in max_iters (4 vs 40), n_embd (384 vs 128): not compared'}]
    md = (out / 'summary.md').read_text()
    assert '| deepseek_moe - dense | -0.200 | - | a group of one run |' in md.splitlines()
    assert '| deepseek_moe - moe |' not in md and '| moe - dense |' not in md
    assert '\n- deepseek_moe and moe differ in max_iters (40 vs 4), n_embd (128 vs 384): not compared\n' in md
    assert 'deepseek_moe - dense: -0.200 (a group of one run: no interval)' in p.stdout.splitlines()
    assert not [x for x in p.stdout.splitlines() if x.startswith(('deepseek_moe - moe', 'moe - dense'))]


def test_single_run_still_works(runs):
    out = runs / 'one'
    p = compare(runs / 'out-dense', '--out', out)
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['pairs'] == [] and len(summary['groups']) == 1
    g = summary['groups'][0]
    assert g['label'] == 'dense (1 run)' and g['runs'] == [str(runs / 'out-dense')]
    assert g['final_val_loss_mean'] == 3.2 and g['final_val_loss_std'] is None and g['best_val_loss_mean'] == 3.0
    assert '| dense (1 run) | 1 | dense | 0.00M | 0.00M | 3.0000 | 3.2000 (100) | 200 | - | - | - |' in p.stdout
    assert 'Differences' not in (out / 'summary.md').read_text()
    assert (out / 'val_loss.png').stat().st_size > 10_000
    assert not (out / 'maxvio.png').exists() and not (out / 'expert_selection.png').exists()   # dense: no experts
    assert not (out / 'tradeoff.png').exists() and summary['tradeoff'] == []
    p = compare(runs / 'out-moe-1', '--out', runs / 'one-moe')                 # a single MoE run: no bands
    assert all((runs / 'one-moe' / f).stat().st_size > 10_000 for f in ('maxvio.png', 'expert_selection.png'))
    assert '| moe (1 run) | 1 | moe |' in p.stdout
    # one MoE group is no trade-off: its row in summary.json, but no figure and no table
    assert not (runs / 'one-moe' / 'tradeoff.png').exists() and 'Balance trade-off' not in p.stdout
    assert [r['group'] for r in json.loads((runs / 'one-moe' / 'summary.json').read_text())['tradeoff']] == ['moe (1 run)']


def test_truncated_empty_and_missing_metrics(runs):
    rows = read_metrics(str(runs / 'out-moe-1' / 'metrics.jsonl'))
    write_run(runs / 'out-cut', rows, truncate_last=True)      # the expert_selection row is cut off
    (runs / 'out-empty').mkdir()
    (runs / 'out-empty' / 'metrics.jsonl').write_text('')
    (runs / 'out-none').mkdir()
    p = compare(runs / 'out-cut', runs / 'out-empty', runs / 'out-none', runs / 'out-dense', '--out', runs / 'cmp')
    assert f'out-cut/metrics.jsonl:{len(rows)} is not valid JSON' in p.stderr
    assert 'out-empty/metrics.jsonl is missing or has no config/eval rows; run skipped' in p.stderr
    assert 'out-none/metrics.jsonl is missing' in p.stderr
    assert '| moe (1 run) | 1 | moe' in p.stdout and '| dense (1 run) | 1 | dense' in p.stdout
    assert (runs / 'cmp' / 'expert_selection.png').exists()     # from the in-progress eval's validation counts
    assert selection_counts(load_run(str(runs / 'out-cut'))) == (
        [[40, 20, 20, 20], [25, 25, 25, 25]], [0, 1], 'in progress: validation batches at iter 100')
    assert selection_counts(load_run(str(runs / 'out-moe-1')))[1:] == ([0, 1], 'final')
    assert selection_counts(load_run(str(runs / 'out-dense'))) is None
    # expert choice: the final selection is routed token by token (in training every expert gets exactly 1/E)
    ec = moe_rows('moe', 1, (3.2, 3.0), [0.0, 0.0], [0.5, 0.5], [0.0, 0.0], routing='expert_choice')
    write_run(runs / 'out-ec', ec)
    assert selection_counts(load_run(str(runs / 'out-ec'))) == ([[10, 30, 0, 0], [5, 5, 5, 25]], [0, 1],
                                                                'final, token by token')
    p = compare(runs / 'out-empty', '--out', runs / 'cmp2', check=False)
    assert p.returncode != 0 and 'no usable runs' in p.stderr and 'Traceback' not in p.stderr


def test_runs_of_one_group_ending_at_different_iterations(runs):
    rows = moe_rows('moe', 4, (3.3, 3.5), [1.0, 1.0], [0.5, 0.5], [0.1, 0.0],
                    balance_loss_coef=0.01)[:-2]                          # still running: last eval at 50
    write_run(runs / 'out-moe-4', rows)
    p = compare(runs / 'out-moe-1', runs / 'out-moe-4', '--out', runs / 'cmp')
    assert 'moe (2 seeds) end at different iterations [50, 100]' in p.stderr
    assert '| moe (2 seeds) | 2 | moe | 0.00M | 0.00M | 3.1700 ± 0.1838 | 3.1700 ± 0.1838 (50-100) |' in p.stdout


def test_default_finds_out_dirs_in_cwd(runs):
    """Without run directories compare.py takes every out*/ here that holds a metrics.jsonl, and nothing else."""
    write_run(runs / 'elsewhere', dense_rows(5, (3.0, 3.5)))             # not named out*: left out
    (runs / 'out-empty').mkdir()                                          # out* without metrics: left out
    p = subprocess.run([sys.executable, os.path.join(REPO, 'compare.py')], cwd=runs, env={**env(), 'PYTHONPATH': REPO},
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    summary = json.loads((runs / 'compare_out' / 'summary.json').read_text())
    found = sorted(os.path.normpath(d) for g in summary['groups'] for d in g['runs'])
    assert found == sorted(os.path.basename(str(d)) for d in run_dirs(runs))
    assert [g['label'] for g in summary['groups']] == ['deepseek_moe (3 seeds)', 'dense (1 run)', 'moe (3 seeds)']
    assert (runs / 'compare_out' / 'val_loss.png').exists()


def test_two_tiny_real_runs_and_routing(gpt2_runs, tmp_path, gpt2):
    dense = gpt2_runs['dense'][0]                         # 10 iterations each, evals at 0, 5 and 10 (conftest)
    run_dir = copy_run(gpt2_runs['deepseek_moe'][0], tmp_path, 'out-deepseek_moe')      # it gets a look
    # an eval_only look at the finished deepseek_moe run appends a config row and an eval row at iteration 10
    before = read_metrics(str(run_dir / 'metrics.jsonl'))
    run_script('train.py', ['--init_from=resume', f'--out_dir={run_dir}', '--eval_only=True'])
    look = read_metrics(str(run_dir / 'metrics.jsonl'))[len(before):]
    assert [(r['type'], r['iter']) for r in look] == [('config', 10), ('eval', 10)] and look[0]['config']['eval_only']
    assert 'maxvio_batch' not in look[1]
    own_final = [r for r in before if r['type'] == 'eval'][-1]
    out = tmp_path / 'cmp'
    p = compare(dense, run_dir, '--out', out)
    assert all((out / f).exists() for f in ('val_loss.png', 'expert_selection.png', 'maxvio.png', 'summary.md', 'summary.json'))
    look_free = json.loads((out / 'summary.json').read_text())['groups'][1]
    assert look_free['label'] == 'deepseek_moe (1 run)' and look_free['final_val_loss_runs'] == [own_final['val_loss']]
    assert look_free['final_maxvio_batch'] == pytest.approx(np.mean(own_final['maxvio_batch']))
    sel = [r for r in read_metrics(str(run_dir / 'metrics.jsonl')) if r['type'] == 'expert_selection'][0]
    assert all(sum(layer) == pytest.approx(1.0) for layer in load_shares(sel['counts']))
    assert '| deepseek_moe (1 run) | 1 | deepseek_moe' in p.stdout
    groups = json.loads((out / 'summary.json').read_text())['groups']
    assert groups[1]['final_maxvio_batch'] is not None and groups[1]['final_maxvio_global'] is not None
    p = compare('--routing', run_dir, '--text', 'Once upon a time', '--out', out, '--val-tokens', 2000)
    assert (out / 'routing.png').exists()
    top = (out / 'top_tokens.md').read_text()
    rows = [line for line in top.splitlines() if re.match(r'\| \d+ \|', line)]
    assert len(rows) == 30                                          # one row per routed expert
    slots = sum(int(line.split('|')[2].replace(',', '')) for line in rows)
    assert slots == (2000 // 32) * 32 * 6                          # every validation token, top-6
    p = compare('--routing', dense, check=False)
    assert p.returncode != 0 and 'dense run' in p.stderr


def test_expert_choice_groups_get_both_evaluations(tmp_path):
    """val_loss (causal) and val_loss_leaky (as trained) of expert-choice runs: their means, and the leak taken run
    by run, with a 95% interval (by hand: leaks 0.3, 0.5 -> mean 0.4, half-width 12.706 * 0.1414 / 1.4142 = 1.2706)."""
    from compare import leak_row, leak_table
    dirs = []
    for seed, (causal, leaky) in ((1, (3.0, 3.3)), (2, (3.2, 3.7))):
        rows = moe_rows('moe', seed, (causal + 0.1, causal), [0.0, 0.0], [0.5, 0.5], [0.0, 0.0],
                        routing='expert_choice', expert_choice_group=0)
        rows[-2]['val_loss_leaky'] = leaky
        write_run(tmp_path / f'ec-{seed}', rows)
        dirs.append(tmp_path / f'ec-{seed}')
    write_run(tmp_path / 'tc', moe_rows('moe', 1, (3.2, 3.1), [0.1, 0.1], [0.1, 0.1], [0.0, 0.0]))
    groups = group_runs([load_run(str(d)) for d in dirs + [tmp_path / 'tc']])
    row = leak_row(groups[0])
    assert row['causal_mean'] == pytest.approx(3.1) and row['leaky_mean'] == pytest.approx(3.5)
    assert row['leak_runs'] == pytest.approx([0.3, 0.5]) and row['leak_mean'] == pytest.approx(0.4)
    assert row['leak_half_width'] == pytest.approx(12.706 * math.sqrt(0.02) / math.sqrt(2))
    assert leak_row(groups[1]) is None                                 # token choice: one evaluation
    assert '| moe [routing=expert_choice] (2 seeds) | 0 | 3.1000 ± ' in leak_table([row])
    p = compare(*dirs, tmp_path / 'tc', '--out', tmp_path / 'cmp')
    assert 'Expert choice, evaluated two ways' in p.stdout
    assert json.loads((tmp_path / 'cmp' / 'summary.json').read_text())['expert_choice'][0]['leak_mean'] == pytest.approx(0.4)


def test_groups_named_by_their_run_directories(tmp_path):
    from compare import name_by_directory
    for name, coef in (('aux_1e-2-s1', 0.01), ('aux_1e-2-s2', 0.01), ('free-s1', 0.0)):
        write_run(tmp_path / name, moe_rows('deepseek_moe', int(name[-1]), (3.2, 3.0), [0.1, 0.1], [0.1, 0.1], [0.0, 0.0],
                                            balance_loss_coef=coef))
    write_run(tmp_path / 'odd', moe_rows('deepseek_moe', 3, (3.2, 3.0), [0.1, 0.1], [0.1, 0.1], [0.0, 0.0],
                                         balance_loss_coef=0.0))            # groups with free-s1: two stems, kept
    groups = group_runs([load_run(str(tmp_path / n)) for n in ('aux_1e-2-s1', 'aux_1e-2-s2', 'free-s1', 'odd')])
    name_by_directory(groups)
    assert [g['label'] for g in groups] == ['aux_1e-2 (2 seeds)', 'deepseek_moe [balance_loss_coef=0.0] (2 seeds)']
