"""bench.py: its arithmetic by hand, its models at equal active width, and one tiny run of the script.
No timing is asserted anywhere: timings belong to the printed table, not to tests."""

import math
import os
import subprocess
import sys

import pytest

from bench import (SCALING, compiled, first_ffn, interleaved_times, median_ratio, model_configs, round_order,
                   scaling_slope)
from conftest import REPO, run_script, subprocess_env
from model import GPT


def test_median_ratio_is_the_median_of_per_round_ratios():
    # rounds 2/1, 3/3, 8/2 -> ratios 2, 1, 4 -> median 2 (the ratio of medians would be 3/2)
    assert median_ratio([2.0, 3.0, 8.0], [1.0, 3.0, 2.0]) == 2.0


def test_rounds_rotate_so_no_model_always_runs_first():
    assert [round_order(['a', 'b', 'c'], r) for r in range(4)] == [['a', 'b', 'c'], ['b', 'c', 'a'], ['c', 'a', 'b'],
                                                                    ['a', 'b', 'c']]
    calls = []
    times = interleaved_times({n: (lambda n=n: calls.append(n)) for n in 'abc'}, warmup=1, rounds=3, device='cpu')
    assert calls == list('abc') + list('abc') + list('bca') + list('cab')    # warm-up, then rotated rounds
    assert all(len(t) == 3 and min(t) >= 0 for t in times.values())


def test_scaling_slope_by_hand():
    # cost = 0.7 * E^0.5 exactly: slope 0.5 whatever the constant
    points = [(e, 0.7 * math.sqrt(e)) for e in (8, 64, 256)]
    assert scaling_slope(points) == pytest.approx(0.5)
    assert scaling_slope([(8, 1.3), (64, 1.3), (256, 1.3)]) == pytest.approx(0.0)   # free experts
    # two points: log(4 / 1) / log(64 / 8) = log 4 / log 8 = 2/3
    assert scaling_slope([(8, 1.0), (64, 4.0)]) == pytest.approx(2 / 3)


def test_every_benchmarked_model_has_the_dense_active_width():
    configs = model_configs(2, 256, 1024, 64, scaling=True)
    assert [name for name in configs] == ['dense', 'moe', 'deepseek_moe'] + [f'E={e}' for e, _ in SCALING]
    # built from the config files, every setting included (the hand-built ones once lacked seq_aux_coef)
    from test_moe import build_from_config
    for name in ('dense', 'moe', 'deepseek_moe'):
        want = build_from_config(f'{name}.py').config
        assert configs[name] == type(want)(**{**want.__dict__, 'n_layer': 2, 'n_embd': 256, 'n_head': 4,
                                             'vocab_size': 1024, 'block_size': 64,
                                             'expert_hidden': configs[name].expert_hidden,
                                             'ffn_hidden': configs[name].ffn_hidden}), name
    assert configs['deepseek_moe'].seq_aux_coef == 1e-4 and configs['E=64'].seq_aux_coef == 1e-4
    assert [configs[f'E={e}'].n_experts for e, _ in SCALING] == [8, 64, 256]   # what the issue asks
    dense_active = GPT(configs['dense']).param_counts()['active']
    for name, cfg in configs.items():
        if cfg.ffn_type == 'dense':
            continue
        assert (cfg.top_k + cfg.n_shared_experts) * cfg.expert_hidden == configs['dense'].ffn_hidden == 4 * 256, name
        # active parameters differ from dense only by the router, E x C per layer
        active = GPT(cfg).param_counts()['active']
        assert active - dense_active == cfg.n_layer * cfg.n_experts * cfg.n_embd, name


def test_the_timed_layers_are_initialised_as_in_training():
    """bench.py once timed a bare MoE whose expert weights were torch.empty (NaNs, values up to 1e4) against an
    initialised dense layer: every timed layer is now a real model's first FFN."""
    import math
    import torch
    for name, cfg in model_configs(2, 256, 1024, 64, scaling=False).items():
        layer = first_ffn(cfg)
        for pname, p in layer.named_parameters():
            assert torch.isfinite(p).all(), (name, pname)
            std = 0.02 / math.sqrt(2 * 2) if pname.endswith(('w_down', 'c_proj.weight')) else 0.02
            assert p.std().item() == pytest.approx(std, rel=0.1), (name, pname)


def test_every_compiled_model_gets_its_own_graph():
    """bench.py compiles 6 models per size in one process. With dynamo's defaults the 9th compile of
    GPT.forward hits the recompile limit of 8 and that model silently runs eager; bench.compiled() must give
    every model its own graph. Here the limit starts at 5, so that one size's 6 models pass it (a compiled() that
    kept the limit: 5 graphs, not 6) at half the compiles of two sizes."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    n_models = 0
    # compiled() changes dynamo's settings for the process; config.patch restores them afterwards (pytest's
    # monkeypatch does not: from pytest 9.2 its undo leaves the option hidden for every later test)
    with torch._dynamo.config.patch(recompile_limit=5, fail_on_recompile_limit_hit=False):
        for cfg in model_configs(1, 64, 256, 16, scaling=True).values():
            torch.manual_seed(0)
            model = compiled(GPT(cfg), backend='aot_eager')      # aot_eager: without inductor's C++ build
            x = torch.randint(0, 256, (2, 16))
            with torch.autocast('cpu', dtype=torch.bfloat16):       # the grouped_mm path, as on CUDA
                _, loss, _ = model(x, x, return_aux=True)
            loss.backward()
            n_models += 1
    assert torch._dynamo.config.recompile_limit == 8 and not torch._dynamo.config.fail_on_recompile_limit_hit
    assert n_models == 6
    assert counters['stats']['unique_graphs'] == 6
    assert not counters['graph_break']
    torch._dynamo.reset()


def test_tiny_cpu_run_prints_both_tables_and_the_slope():
    cmd = [sys.executable, os.path.join(REPO, 'bench.py'), '--device', 'cpu', '--sizes', '1x64', '--batch_size', '2',
           '--block_size', '16', '--vocab_size', '256', '--warmup', '1', '--rounds', '2', '--threads', '1']
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env(), cwd=REPO)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    step_rows = [line for line in lines if line.startswith('| ') and line.endswith('x |') and 'M |' in line]
    assert [row.split(' | ')[0][2:] for row in step_rows] == ['dense', 'moe', 'deepseek_moe', 'E=8', 'E=64', 'E=256']
    assert step_rows[0].endswith('| 1.000x |')                  # dense over itself, every round
    layer_rows = [line for line in lines if line.startswith('| ') and 'x |' in line and 'M |' not in line]
    assert len(layer_rows) == 6
    assert any(line.startswith('scaling from 8 to 256 routed experts') for line in lines)
    # a bad size is one clear line, not a traceback (inside this process: the process was checked above)
    bad = run_script('bench.py', cmd[2:5] + ['2x64', '6by384'], check=False)
    assert bad.returncode != 0 and "--sizes takes n_layer x n_embd" in bad.stderr and 'Traceback' not in bad.stderr
