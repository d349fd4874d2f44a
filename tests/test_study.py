"""results/study.py, the studies' runner, and the runs files it reads: every run in them is a valid train.py
command, so a typo in a runs file fails here and not hours into a study."""

import glob
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'results'))

import study                                    # noqa: E402  (results/study.py)
from configurator import configure              # noqa: E402
from model import GPTConfig                     # noqa: E402
from train import DEFAULTS, MODEL_KEYS, check_settings  # noqa: E402

RUNS_FILES = sorted(glob.glob(os.path.join(REPO, 'results', '*', 'runs.txt')))


def test_read_runs_skips_comments_and_blank_lines(tmp_path):
    path = tmp_path / 'runs.txt'
    path.write_text("# a comment\n\nmoe-s1  config/moe.py --seed=1   # trailing comment\n"
                    "dense-s1 config/dense.py\n")
    assert study.read_runs(str(path)) == [('moe-s1', ['config/moe.py', '--seed=1']), ('dense-s1', ['config/dense.py'])]


def test_read_runs_refuses_a_repeated_name(tmp_path):
    path = tmp_path / 'runs.txt'
    path.write_text("moe-s1 config/moe.py\nmoe-s1 config/moe.py --seed=2\n")
    with pytest.raises(ValueError, match="repeat.*moe-s1"):
        study.read_runs(str(path))


def write_metrics(run_dir, rows, tail=''):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, 'metrics.jsonl'), 'w') as f:
        f.write(''.join(json.dumps(r) + '\n' for r in rows) + tail)


def test_finished_needs_the_eval_at_max_iters_of_the_latest_config(tmp_path):
    run = str(tmp_path / 'run')
    assert not study.finished(run)                                    # no metrics at all
    config = {'type': 'config', 'config': {'max_iters': 10}}
    write_metrics(run, [config, {'type': 'eval', 'iter': 5}])
    assert not study.finished(run)                                    # cut off before the end
    write_metrics(run, [config, {'type': 'eval', 'iter': 10, 'eval_only': True}])
    assert not study.finished(run)                                    # a look is not the run's end
    write_metrics(run, [config, {'type': 'eval', 'iter': 10}], tail='{"type": "tra')
    assert study.finished(run)                                        # a line cut off by a kill is skipped
    # resumed with more iterations: the latest config row's max_iters counts
    write_metrics(run, [config, {'type': 'eval', 'iter': 10}, {'type': 'config', 'config': {'max_iters': 20}}])
    assert not study.finished(run)


@pytest.mark.parametrize('runs_file', RUNS_FILES, ids=lambda p: os.path.basename(os.path.dirname(p)))
def test_every_run_is_a_valid_train_command(runs_file, monkeypatch):
    monkeypatch.chdir(REPO)                      # config files are named relative to the repo root
    runs = study.read_runs(runs_file)
    assert runs
    for name, args in runs:
        settings = configure(DEFAULTS, args)
        check_settings(settings)
        GPTConfig(**{k: settings[k] for k in MODEL_KEYS})
        assert name.endswith(f"-s{settings['seed']}"), f"{name}: its name and --seed={settings['seed']} disagree"


def test_one_run_serves_the_cpu_and_the_balance_study():
    """results/cpu's deepseek_moe-sN and results/balance's default-sN are the same command (runs.txt says so, and
    the balance study copies the finished run instead of training it twice)."""
    cpu = dict(study.read_runs(os.path.join(REPO, 'results', 'cpu', 'runs.txt')))
    balance = dict(study.read_runs(os.path.join(REPO, 'results', 'balance', 'runs.txt')))
    defaults = [n for n in balance if n.startswith('default-s')]
    assert defaults
    for name in defaults:
        assert balance[name] == cpu[name.replace('default', 'deepseek_moe')]


def test_run_group_is_the_name_without_its_seed():
    assert [study.run_group(n) for n in ('deepseek_moe-s3', 'moe-s10', 'aux_1e-2-s1', 'dense')] == \
        ['deepseek_moe', 'moe', 'aux_1e-2', 'dense']


def test_only_runs_the_named_groups_and_refuses_an_unknown_one(tmp_path, monkeypatch, capsys):
    runs = tmp_path / 'study' / 'runs.txt'
    runs.parent.mkdir()
    runs.write_text("moe-s1 config/moe.py\ndense-s1 config/dense.py\nmoe-s2 config/moe.py --seed=2\n")
    trained = []
    monkeypatch.setattr(study, 'prepare_data', lambda: None)
    monkeypatch.setattr(study, 'run_one', lambda name, args, s, cpu, log: trained.append(name) or 'done')
    monkeypatch.setattr(sys, 'argv', ['study.py', str(runs), '--cpus', '0', '--only', 'moe'])
    study.main()
    assert trained == ['moe-s1', 'moe-s2']
    monkeypatch.setattr(sys, 'argv', ['study.py', str(runs), '--only', 'moe,deepseek_moe'])
    with pytest.raises(SystemExit, match='--only names deepseek_moe'):
        study.main()
