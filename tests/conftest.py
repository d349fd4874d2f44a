"""Shared test setup: the repo on sys.path, GPT-2 BPE files from ../shared/tiktoken_cache when present
(set in os.environ, so the scripts the tests start inherit it), the tokenizer as a fixture that skips where its
files can be neither found nor downloaded, scripts run inside the test process, and tiny trained runs made once
per session and shared by every test that only reads them."""

import contextlib
import hashlib
import io
import os
import runpy
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(REPO, '..', 'shared')          # real text samples, when this clone sits beside them
sys.path.insert(0, REPO)
if os.path.isdir(os.path.join(SHARED, 'tiktoken_cache')):
    os.environ.setdefault('TIKTOKEN_CACHE_DIR', os.path.abspath(os.path.join(SHARED, 'tiktoken_cache')))

# train.py at the tests' size: 2 layers, 32 wide, 128 symbols
TINY = ['--device=cpu', '--compile=False', '--n_layer=2', '--n_embd=32', '--n_head=2', '--block_size=32',
        '--batch_size=8', '--vocab_size=128', '--eval_iters=4', '--log_interval=5', '--warmup_iters=5',
        '--learning_rate=3e-3', '--min_lr=3e-4']


def subprocess_env() -> dict:
    """The environment of a script a test starts: one thread each, unbuffered output."""
    return dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')


def run_script(script: str, args: list, check: bool = True, init_globals: dict | None = None
               ) -> subprocess.CompletedProcess:
    """python SCRIPT ARGS inside this process, in the repo's root, answered as subprocess.run would: returncode,
    stdout, stderr. A sys.exit("error: ...") is returncode 1 with that line on stderr, as Python prints it; any
    other exception is raised (a traceback fails the test). Saves a second torch import (2-3 s) per script; the
    process boundary itself (exit codes, signals, stderr) is tested once per script with a real subprocess."""
    import torch
    out, err = io.StringIO(), io.StringIO()
    returncode = 0
    threads = torch.get_num_threads()
    # one thread, as the scripts ran in their own processes (subprocess_env): a tiny model's ops gain nothing from a
    # second one, and lose much when the other core is busy (a 60-step run: 1.8 s against 14 s on a loaded machine)
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.setattr(sys, 'argv', [script, *map(str, args)])
        mp.setattr(sys, 'path', list(sys.path))      # what the script adds to it (data/*/prepare.py does) goes again
        mp.chdir(REPO)
        try:
            runpy.run_path(os.path.join(REPO, script), init_globals=init_globals, run_name='__main__')
        except SystemExit as e:
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
                returncode = 1
            else:
                returncode = e.code or 0
        finally:
            torch.set_num_threads(threads)
    p = subprocess.CompletedProcess([script, *map(str, args)], returncode, out.getvalue(), err.getvalue())
    if check and p.returncode:
        raise AssertionError(f"{script} {args} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope='session')
def gpt2():
    import tiktoken
    try:
        return tiktoken.get_encoding('gpt2')
    except Exception as e:                            # no cache and no internet
        pytest.skip(f'GPT-2 BPE files for tiktoken unavailable ({type(e).__name__}); '
                    f'set TIKTOKEN_CACHE_DIR or go online')


def random_token_data(folder, vocab: int, n_tokens: int) -> str:
    """folder/train.bin and val.bin of uniformly random token ids (for runs that only need to run)."""
    import numpy as np
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for split in ('train', 'val'):
        rng.integers(0, vocab, n_tokens).astype(np.uint16).tofile(os.path.join(folder, f'{split}.bin'))
    return str(folder)


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory) -> str:
    """A learnable token stream over 128 symbols: mostly a fixed successor rule, 10% random tokens."""
    import numpy as np
    d = tmp_path_factory.mktemp('data')
    rng = np.random.default_rng(0)
    for split, n in (('train', 60_000), ('val', 6_000)):
        x = np.zeros(n, dtype=np.uint16)
        for i in range(1, n):
            x[i] = rng.integers(0, 128) if rng.random() < 0.1 else (int(x[i - 1]) * 5 + 3) % 128
        x.tofile(d / f'{split}.bin')
    return str(d)


def digest(folder) -> dict[str, str]:
    """sha256 of every file under folder, by relative path."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, 'rb') as f:
                found[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return found


def copy_run(run_dir, tmp_path, name: str = 'run'):
    """A copy of a shared run directory, for a test that resumes, looks at or otherwise writes into it."""
    return shutil.copytree(run_dir, tmp_path / name)


def train_shared_runs(root, configs: tuple[str, ...], args) -> dict:
    """{config: (run directory, what train.py printed)}: python train.py args(config, out_dir) for each config, in
    this process. Trained when the fixture is set up, before any test body can patch what train.py uses."""
    runs = {}
    for config in configs:
        out = root / config
        runs[config] = (out, run_script('train.py', args(config, out)).stdout)
    return runs


def check_untouched(runs: dict, made: dict) -> None:
    """Every file of the shared runs as it was made: a test that writes into one must copy it first (copy_run)."""
    for config, (out, _) in runs.items():
        assert digest(out) == made[config], f"a test wrote into the shared {config} run {out}: copy it first (copy_run)"


@pytest.fixture(scope='session')
def tiny_runs(data_dir, tmp_path_factory):
    """{config: (run_dir, stdout)} of config/dense.py, moe.py and deepseek_moe.py at the TINY size on data_dir, 60
    iterations with evals at 0, 30 and 60 (the learnable data: the val loss falls by more than 1), made once a
    session and shared by the tests that read them."""

    def args(config, out):
        return [f'config/{config}.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=60',
                '--eval_interval=30', '--lr_decay_iters=60']
    runs = train_shared_runs(tmp_path_factory.mktemp('tiny_runs'), ('dense', 'moe', 'deepseek_moe'), args)
    made = {config: digest(out) for config, (out, _) in runs.items()}
    yield runs
    check_untouched(runs, made)


@pytest.fixture(scope='session')
def gpt2_runs(tmp_path_factory):
    """{config: (run_dir, stdout)} of config/dense.py and deepseek_moe.py at the TINY size but with GPT-2's vocabulary
    (50,304 rows: sample.py and compare.py --routing encode text with GPT-2's BPE) on random GPT-2 ids, 10
    iterations with evals at 0, 5 and 10, made once a session and shared by the tests that read them."""
    data = random_token_data(tmp_path_factory.mktemp('gpt2_data'), 50257, 8000)
    size = [a for a in TINY if not a.startswith(('--vocab_size', '--batch_size', '--eval_iters', '--warmup_iters'))]

    def args(config, out):
        return [f'config/{config}.py', *size, '--batch_size=4', '--eval_iters=2', '--warmup_iters=2',
                f'--data_dir={data}', f'--out_dir={out}', '--max_iters=10', '--eval_interval=5', '--lr_decay_iters=20']
    runs = train_shared_runs(tmp_path_factory.mktemp('gpt2_runs'), ('dense', 'deepseek_moe'), args)
    made = {config: digest(out) for config, (out, _) in runs.items()}
    yield runs
    check_untouched(runs, made)
