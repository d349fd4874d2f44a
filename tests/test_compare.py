"""compare.py on hand-written metrics.jsonl files and on two tiny real runs."""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, random_token_data, subprocess_env as env
from compare import load_shares, mean_maxvio, read_metrics


def compare(*args, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, 'compare.py', *map(str, args)], cwd=REPO, env=env(), capture_output=True,
                       text=True, timeout=300)
    if check and p.returncode:
        raise AssertionError(p.stdout + p.stderr)
    return p


def config_row(ffn_type: str, total: int, active: int, tokens_per_iter: int = 512) -> dict:
    args = {'ffn_type': ffn_type, 'ffn_hidden': 64, 'n_experts': 4, 'top_k': 2, 'n_shared_experts': 0}
    return {'type': 'config', 'iter': 0, 'config': {}, 'model_args': args, 'total_params': total,
            'active_params': active, 'tokens_per_iter': tokens_per_iter}


def write_run(path, rows, truncate_last: bool = False):
    path.mkdir(parents=True)
    text = ''.join(json.dumps(r) + '\n' for r in rows)
    if truncate_last:
        text = text[:-25]                              # a run killed while writing its last line
    (path / 'metrics.jsonl').write_text(text)


@pytest.fixture
def runs(tmp_path):
    dense = [config_row('dense', 1000, 1000),
             {'type': 'eval', 'iter': 0, 'tokens': 0, 'val_loss': 5.0, 'train_loss': 5.0},
             {'type': 'train', 'iter': 10, 'tokens_per_s': 100.0},
             {'type': 'train', 'iter': 20, 'tokens_per_s': 300.0},
             {'type': 'train', 'iter': 30, 'tokens_per_s': 200.0},
             {'type': 'eval', 'iter': 50, 'tokens': 25600, 'val_loss': 3.0, 'train_loss': 3.1},
             {'type': 'eval', 'iter': 100, 'tokens': 51200, 'val_loss': 3.2, 'train_loss': 2.9}]
    moe = [config_row('moe', 2000, 1100),
           {'type': 'eval', 'iter': 0, 'tokens': 0, 'val_loss': 5.0, 'train_loss': 5.0},
           {'type': 'eval', 'iter': 50, 'tokens': 25600, 'val_loss': 2.9, 'train_loss': 2.9,
            'expert_counts': [[40, 20, 20, 20], [25, 25, 25, 25]], 'maxvio': [1.0, 0.0], 'dropped_frac': [0.1, 0.0]},
           {'type': 'expert_selection', 'iter': 50, 'layers': [0, 1], 'counts': [[10, 30, 0, 0], [5, 5, 5, 25]]}]
    write_run(tmp_path / 'out-dense', dense)
    write_run(tmp_path / 'out-moe', moe)
    return tmp_path


def test_pure_metric_functions():
    shares = load_shares([[10, 30, 0, 0], [5, 5, 5, 25]])
    assert shares == [[0.25, 0.75, 0.0, 0.0], [0.125, 0.125, 0.125, 0.625]]
    assert all(sum(layer) == pytest.approx(1.0) for layer in shares)
    # layer 0: max 40 / mean 25 - 1 = 0.6; layer 1: 0; mean 0.3
    assert mean_maxvio([[40, 20, 20, 20], [25, 25, 25, 25]]) == pytest.approx(0.3)


def test_figures_and_table(runs):
    out = runs / 'cmp'
    p = compare(runs / 'out-dense', runs / 'out-moe', '--out', out)
    for name in ('val_loss.png', 'expert_selection.png', 'maxvio.png', 'summary.md'):
        assert (out / name).stat().st_size > 1000 or name == 'summary.md'
    table = (out / 'summary.md').read_text()
    assert table in p.stdout
    dense_line = next(line for line in table.splitlines() if line.startswith('| out-dense'))
    moe_line = next(line for line in table.splitlines() if line.startswith('| out-moe'))
    # dense: best 3.0, final 3.2 at iter 100, tokens/s = median(100, 300, 200) = 200, no MaxVio
    assert dense_line == '| out-dense | dense | 0.00M | 0.00M | 3.0000 | 3.2000 (100) | 200 | - | - |'
    # moe: MaxVio (0.6 + 0) / 2 = 0.3 from the counts; dropped share (10% + 0%) / 2 = 5%
    assert moe_line == '| out-moe | moe | 0.00M | 0.00M | 2.9000 | 2.9000 (50) | - | 0.300 | 5.00% |'


def test_truncated_empty_and_missing_metrics(runs):
    rows = read_metrics(str(runs / 'out-moe' / 'metrics.jsonl'))
    write_run(runs / 'out-cut', rows, truncate_last=True)      # the expert_selection row is cut off
    (runs / 'out-empty').mkdir()
    (runs / 'out-empty' / 'metrics.jsonl').write_text('')
    (runs / 'out-none').mkdir()
    p = compare(runs / 'out-cut', runs / 'out-empty', runs / 'out-none', runs / 'out-dense', '--out', runs / 'cmp')
    assert 'out-cut/metrics.jsonl:4 is not valid JSON' in p.stderr
    assert 'out-empty/metrics.jsonl is missing or has no config/eval rows; run skipped' in p.stderr
    assert 'out-none/metrics.jsonl is missing' in p.stderr
    assert '| out-cut | moe' in p.stdout and '| out-dense | dense' in p.stdout
    assert (runs / 'cmp' / 'expert_selection.png').exists()     # from the in-progress eval counts
    p = compare(runs / 'out-empty', '--out', runs / 'cmp2', check=False)
    assert p.returncode != 0 and 'no usable runs' in p.stderr and 'Traceback' not in p.stderr


def test_default_finds_out_dirs_in_cwd(runs):
    p = subprocess.run([sys.executable, os.path.join(REPO, 'compare.py')], cwd=runs, env={**env(), 'PYTHONPATH': REPO},
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert '| out-dense |' in p.stdout and '| out-moe |' in p.stdout
    assert (runs / 'compare_out' / 'val_loss.png').exists()


def test_two_tiny_real_runs_and_routing(tmp_path, gpt2):
    data = random_token_data(tmp_path / 'data', 1000, 8000)
    tiny = ['--device=cpu', '--compile=False', '--n_layer=2', '--n_embd=32', '--n_head=2', '--block_size=32',
            '--batch_size=4', '--eval_iters=2', '--max_iters=10', '--eval_interval=5', '--log_interval=5',
            f'--data_dir={data}']
    for config in ('dense', 'deepseek_moe'):
        subprocess.run([sys.executable, 'train.py', f'config/{config}.py', *tiny, f'--out_dir={tmp_path / ("out-" + config)}'],
                       cwd=REPO, env=env(), check=True, capture_output=True, timeout=300)
    out = tmp_path / 'cmp'
    p = compare(tmp_path / 'out-dense', tmp_path / 'out-deepseek_moe', '--out', out)
    assert all((out / f).exists() for f in ('val_loss.png', 'expert_selection.png', 'maxvio.png', 'summary.md'))
    sel = [r for r in read_metrics(str(tmp_path / 'out-deepseek_moe' / 'metrics.jsonl')) if r['type'] == 'expert_selection'][0]
    assert all(sum(layer) == pytest.approx(1.0) for layer in load_shares(sel['counts']))
    assert '| out-deepseek_moe | deepseek_moe' in p.stdout
    p = compare('--routing', tmp_path / 'out-deepseek_moe', '--text', 'Once upon a time', '--out', out,
                '--val-tokens', 2000)
    assert (out / 'routing.png').exists()
    top = (out / 'top_tokens.md').read_text()
    rows = [line for line in top.splitlines() if re.match(r'\| \d+ \|', line)]
    assert len(rows) == 30                                          # one row per routed expert
    slots = sum(int(line.split('|')[2].replace(',', '')) for line in rows)
    assert slots == (2000 // 32) * 32 * 6                          # every validation token, top-6
    p = compare('--routing', tmp_path / 'out-dense', check=False)
    assert p.returncode != 0 and 'dense run' in p.stderr
