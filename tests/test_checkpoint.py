"""Opening a checkpoint never runs code: every script reads it with torch.load(weights_only=True) through
model.read_checkpoint; a crafted file is refused in one line and nothing in it runs; an old-format file of one's
own is converted once with convert_checkpoint.py --i-trust-this-file."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, random_token_data, run_script, subprocess_env as env
from model import load_checkpoint, read_checkpoint

TINY = ['--device=cpu', '--compile=False', '--n_layer=2', '--n_embd=32', '--n_head=2', '--block_size=32',
        '--batch_size=4', '--eval_iters=2', '--log_interval=5', '--warmup_iters=2', '--lr_decay_iters=20']


def run(args, check=True):
    """python ARGS as a process of its own."""
    p = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    if check and p.returncode:
        raise AssertionError(p.stdout + p.stderr)
    return p


def run_in_process(args, check=True):
    """python SCRIPT ARGS... inside this process (conftest.run_script)."""
    return run_script(args[0], args[1:], check=check)


class Marker:
    """Unpickling this creates the file `path`: what a crafted checkpoint or meta.pkl could do with os.system."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, 'w'))


@pytest.fixture(scope='module')
def trained(gpt2_runs):
    """A real checkpoint of a tiny deepseek_moe run (GPT-2-sized vocabulary, so sample.py can decode): the session's
    shared one, 10 iterations (conftest.gpt2_runs), read here and never written."""
    return gpt2_runs['deepseek_moe'][0]


def crafted(tmp_path, trained, name='evil'):
    """A run directory whose ckpt.pt is a real checkpoint plus one entry that creates a marker file when unpickled."""
    run_dir = tmp_path / name
    run_dir.mkdir()
    ckpt = torch.load(trained / 'ckpt.pt', weights_only=True)
    marker = tmp_path / f'{name}-MARKER'
    torch.save({**ckpt, 'payload': Marker(marker)}, run_dir / 'ckpt.pt')
    return run_dir, marker


def test_a_checkpoint_written_now_loads_with_weights_only(trained):
    ckpt = torch.load(trained / 'ckpt.pt', weights_only=True)
    assert ckpt['iter_num'] == 10 and not any(k.endswith('rng_state') for k in ckpt)
    model, _ = load_checkpoint(str(trained / 'ckpt.pt'))
    assert model.moe_layers()[0].expert_bias.abs().sum() > 0


@pytest.mark.parametrize('script', ['train', 'sample', 'compare'])
def test_a_crafted_checkpoint_is_refused_and_nothing_runs(script, trained, tmp_path):
    run_dir, marker = crafted(tmp_path, trained)
    before = (run_dir / 'ckpt.pt').read_bytes()
    args = {'train': ['train.py', f'--out_dir={run_dir}', '--init_from=resume', '--max_iters=20'],
            'sample': ['sample.py', f'--out_dir={run_dir}', '--device=cpu', '--max_new_tokens=2'],
            'compare': ['compare.py', '--routing', run_dir, '--out', tmp_path / 'cmp', '--device', 'cpu']}[script]
    p = run_in_process(args, check=False)
    assert p.returncode != 0 and 'Traceback' not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert 'needs io.open to load, which could run code, so it was not opened' in p.stderr
    assert not marker.exists()
    assert (run_dir / 'ckpt.pt').read_bytes() == before


def test_a_crafted_meta_pkl_is_refused_and_nothing_runs(trained, tmp_path):
    import pickle
    data = random_token_data(tmp_path / 'data', 300, 3000)
    marker = tmp_path / 'META-MARKER'
    with open(os.path.join(data, 'meta.pkl'), 'wb') as f:
        pickle.dump({'vocab_size': 300, 'gpt2_ids': list(range(300)), 'x': Marker(marker)}, f)
    p = run_in_process(['train.py', 'config/dense.py', *TINY, f'--data_dir={data}', f'--out_dir={tmp_path / "out"}',
                        '--max_iters=2'], check=False)
    assert p.returncode != 0 and 'Traceback' not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert 'meta.pkl' in p.stderr and not marker.exists()


def test_an_old_format_checkpoint_is_refused_then_converted_once_and_resumes(trained, tmp_path):
    """Earlier versions saved numpy's and Python's RNG states, which need unpickling of numpy objects: refused with
    the way out; convert_checkpoint.py (only with --i-trust-this-file) rewrites it, and the run resumes from it."""
    run_dir = tmp_path / 'old'
    run_dir.mkdir()
    ckpt = torch.load(trained / 'ckpt.pt', weights_only=True)
    torch.save({**ckpt, 'torch_rng_state': torch.get_rng_state(), 'numpy_rng_state': np.random.get_state(),
                'python_rng_state': __import__('random').getstate()}, run_dir / 'ckpt.pt')
    with pytest.raises(ValueError, match='convert_checkpoint.py --i-trust-this-file'):
        read_checkpoint(str(run_dir / 'ckpt.pt'))
    # no trust, no reading: the script as a process of its own (exit code, stderr); the rest inside this process
    p = run(['convert_checkpoint.py', run_dir / 'ckpt.pt'], check=False)
    assert p.returncode != 0 and '--i-trust-this-file' in p.stderr
    p = run_in_process(['convert_checkpoint.py', '--i-trust-this-file', run_dir / 'ckpt.pt'])
    assert 'numpy_rng_state' in p.stdout and (run_dir / 'ckpt.pt.pickled').exists()
    converted = torch.load(run_dir / 'ckpt.pt', weights_only=True)
    assert set(converted) == set(ckpt)
    # that version summed the aux losses over the 2 MoE layers: the coefficients double to keep their strength
    assert converted['config']['seq_aux_coef'] == pytest.approx(2 * ckpt['config']['seq_aux_coef'])
    assert converted['model_args']['seq_aux_coef'] == pytest.approx(2 * ckpt['model_args']['seq_aux_coef'])
    original = (run_dir / 'ckpt.pt.pickled').read_bytes()
    p = run_in_process(['convert_checkpoint.py', '--i-trust-this-file', run_dir / 'ckpt.pt'])   # twice: nothing to do
    assert 'already in the safe form' in p.stdout and (run_dir / 'ckpt.pt.pickled').read_bytes() == original
    run_in_process(['train.py', f'--out_dir={run_dir}', '--init_from=resume', '--max_iters=12', '--eval_interval=2'])
    assert read_checkpoint(str(run_dir / 'ckpt.pt'))['iter_num'] == 12


def test_a_file_that_is_not_a_checkpoint_is_corrupt_not_unsafe(tmp_path):
    bad = tmp_path / 'ckpt.pt'
    bad.write_bytes(b'\x00garbage' * 100)
    with pytest.raises(ValueError, match='corrupt or unreadable'):
        read_checkpoint(str(bad))
