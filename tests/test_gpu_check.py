"""bench/gpu_check.sh and bench/gpu_summary.py: the script's syntax and its budget against the device call its header
gives, the summary's arithmetic by hand, and the quick dry run end to end (DRY_RUN=quick: every step on the CPU in
bf16, eager, at a toy size). The full dry run, compiled (DRY_RUN=1: half an hour on the busy 2-core machine), is a
command to run by hand before a GPU call; its header says so."""

import os
import re
import shutil
import subprocess
import sys
import tarfile

import pytest

from conftest import REPO, random_token_data, subprocess_env

sys.path.insert(0, os.path.join(REPO, 'bench'))
from gpu_summary import (QUICKSTART_EVAL_INTERVAL, QUICKSTART_EVAL_ITERS, QUICKSTART_ITERS,  # noqa: E402
                         expects_grouped, n_evals, projected_run_s, run_checks, run_figures)

SCRIPT = os.path.join(REPO, 'bench', 'gpu_check.sh')
with open(SCRIPT) as _f:
    TEXT = _f.read()


def caps(mode: str) -> dict[str, int]:
    """The caps of a mode as the script writes them: GPU_CAPS="ENV=15 TESTS=75 ..."."""
    line = re.search(rf'^{mode}_CAPS="([^"]*)"$', TEXT, re.M).group(1)
    return {k: int(v) for k, v in (kv.split('=') for kv in line.split())}


def array(name: str) -> list[str]:
    """The first assignment of a bash array NAME=(...) in the script (the GPU's), as words."""
    return re.search(rf'^{name}=\(([^)]*)\)', TEXT, re.M).group(1).split()


@pytest.mark.skipif(shutil.which('bash') is None, reason='no bash')
def test_script_parses():
    p = subprocess.run(['bash', '-n', SCRIPT], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_the_budget_fits_six_minutes_and_two_calls_fit_the_lease():
    """The issue's budget: at most 6 minutes on the GPU, everything included; its steps' caps (a kill grace of
    5 s only where a step is cut) and the summaries inside the total; the device call's timeout above the total and
    at most the tool's 600 s; two calls with a one-minute start each inside the 15 minutes of device time."""
    gpu = caps('GPU')
    reserve = int(re.search(r'^RESERVE=(\d+)', TEXT, re.M).group(1))
    mandatory = gpu['ENV'] + gpu['TESTS'] + gpu['BENCH'] + 3 * gpu['TRAIN']
    assert gpu['TOTAL'] <= 360 and mandatory + reserve <= gpu['TOTAL'], gpu
    assert re.search(rf"^#\s+total\s+{gpu['TOTAL']}\s", TEXT, re.M)                    # the header's table says so
    for step in ('env', 'tests', 'bench', 'scaling'):
        assert re.search(rf"^#\s+{step}\s+{gpu[step.upper()]}\s", TEXT, re.M), step
    assert re.search(rf"^#\s+train\s+3 x {gpu['TRAIN']}\s", TEXT, re.M)
    timeout_s = int(re.search(r'^#\s+timeout_s:\s+(\d+)$', TEXT, re.M).group(1))
    assert gpu['TOTAL'] + 30 <= timeout_s <= 600
    assert 2 * (60 + gpu['TOTAL']) <= 15 * 60
    carry = re.search(r'^#\s+carry:\s+(\[.*\])$', TEXT, re.M).group(1)
    for name in ('train.bin', 'val.bin', 'meta.json'):
        assert f'"data/tinystories/{name}"' in carry, name


def test_the_short_runs_are_the_quickstart_runs_first_iterations_under_one_pass():
    """The GPU's training runs change only their length and evaluation: the model, batch and LR schedule are the
    Quickstart's (so its warmup is not shortened), and they read less than one pass over the 3,316,853 training
    tokens of the sample. The projection uses train.py's own run length and evaluation."""
    from train import DEFAULTS
    args = dict(a.lstrip('-').split('=') for a in array('TRAIN_ARGS'))
    assert set(args) == {'device', 'dtype', 'compile', 'max_iters', 'eval_interval', 'eval_iters', 'log_interval'}
    assert int(args['max_iters']) <= DEFAULTS['warmup_iters']                      # still warming up at the end
    assert int(args['max_iters']) * DEFAULTS['batch_size'] * DEFAULTS['block_size'] <= 3_316_853
    assert (QUICKSTART_ITERS, QUICKSTART_EVAL_INTERVAL, QUICKSTART_EVAL_ITERS) == (
        DEFAULTS['max_iters'], DEFAULTS['eval_interval'], DEFAULTS['eval_iters'])
    bench = array('BENCH_ARGS')                                            # bench.py at the size train.py runs
    value = {k: v for k, v in zip(bench, bench[1:]) if k.startswith('--')}
    assert value['--sizes'] == f"{DEFAULTS['n_layer']}x{DEFAULTS['n_embd']}"
    assert [int(value[k]) for k in ('--batch_size', '--block_size', '--vocab_size')] == [
        DEFAULTS['batch_size'], DEFAULTS['block_size'], DEFAULTS['vocab_size']]


def test_bench_and_train_set_the_same_global_matmul_settings():
    """inductor's FX-graph cache key holds torch.backends.cuda.matmul's settings (TF32 among them). If bench.py set
    one that train.py does not, train.py would miss the graphs bench.py compiled, and each of the three training
    runs would compile cold on the GPU, tens of seconds each: the 6-minute budget rests on this. Both take TF32 from
    runtime.Runtime.tf32 (bench.py once set it on every CUDA run, train.py only in a float32 one)."""
    def settings(path: str) -> tuple[list[str], str]:
        with open(os.path.join(REPO, path)) as f:
            text = f.read()
        return sorted(set(re.findall(r'^\s*(torch\.backends\.[\w.]+ = .+?)\s*(?:#.*)?$', text, re.M))), text
    bench, bench_text = settings('bench.py')
    train, train_text = settings('train.py')
    assert bench == train == ['torch.backends.cuda.matmul.allow_tf32 = True']
    for text in (bench_text, train_text):
        assert re.search(r'\.tf32:.*\n\s+torch\.backends\.cuda\.matmul\.allow_tf32 = True', text)


def test_n_evals_and_the_projection_by_hand():
    assert n_evals(5000, 250) == 21                  # 0, 250, ..., 5000
    assert n_evals(210, 100) == 4                    # 0, 100, 200 and the end
    # 5,000 steps of 20 ms = 100 s; 21 evals x 100 batches x 5 ms = 10.5 s; compile 30 s
    assert projected_run_s(20.0, 0.005, 30.0) == pytest.approx(140.5)


def test_run_figures_by_hand():
    """40 iterations logged every 10, evals at 0 and 40 of 2 batches a split. Windows: 10 x 500 ms (the compile),
    then 100, 120, 100 ms/iter: steady median 100 ms, the compile 5 - 10 x 0.1 = 4 s. The windows take 8.2 s, the
    evals are 8.6 s apart, so the last eval took 0.4 s: 0.1 s a batch."""
    rows = [{'type': 'config', 'config': {'max_iters': 40, 'eval_iters': 2}, 'dtype': 'bfloat16',
             'tokens_per_iter': 1000, 'runtime': {'compile': True}},
            {'type': 'eval', 'iter': 0, 'val_loss': 5.0, 'elapsed_s': 5.0}]
    for it, ms, mfu in ((10, 500.0, 0.01), (20, 100.0, 0.30), (30, 120.0, 0.25), (40, 100.0, 0.30)):
        rows.append({'type': 'train', 'iter': it, 'loss': 4.0, 'ms_per_iter': ms, 'tokens_per_s': 1e6 / ms, 'mfu': mfu})
    rows.append({'type': 'eval', 'iter': 40, 'val_loss': 4.0, 'elapsed_s': 13.6})
    f = run_figures(rows)
    assert (f['iters'], f['max_iters'], f['ms'], f['mfu'], f['tokens_s']) == (40, 40, 100.0, 0.30, 10_000.0)
    assert f['compile_train_s'] == pytest.approx(4.0)
    assert f['eval0_s'] == 5.0
    assert f['eval_batch_s'] == pytest.approx(0.1)
    # 5,000 x 0.1 s + 21 x 100 x 0.1 s + (4 + 5) s
    assert f['projected_s'] == pytest.approx(500 + 210 + 9)
    cut = run_figures(rows[:4])                      # killed after its second window: no last eval, no projection
    assert cut['iters'] == 20 and cut['ms'] == 100.0 and cut['projected_s'] is None


def test_grouped_mm_is_expected_where_runtime_picks_it():
    assert expects_grouped({'device_type': 'cpu', 'where': 'no CUDA GPU, no MPS'})
    assert expects_grouped({'device_type': 'cuda', 'where': 'NVIDIA H100 80GB HBM3, sm90'})
    assert expects_grouped({'device_type': 'cuda', 'where': 'NVIDIA B200, sm100'})
    assert expects_grouped({'device_type': 'cuda', 'where': 'NVIDIA A100-SXM4-40GB, sm80'})   # one graph all the same
    assert not expects_grouped({'device_type': 'cuda', 'where': 'Tesla T4, sm75'})


def test_run_checks_catch_the_wrong_path():
    """A MoE run on an H100 must be bf16, compiled, grouped_mm, finite, MFU-logged, with the one recompile train.py
    makes (eval at iteration 0, then training) and no graph break; each way of missing that fails its own check."""
    rt = {'device_type': 'cuda', 'where': 'NVIDIA H100 80GB HBM3, sm90', 'compile': True, 'moe_dispatch': 'grouped'}
    good = {'max_iters': 200, 'iters': 200, 'dtype': 'bfloat16', 'runtime': rt, 'losses': [10.9, 6.0],
            'val_losses': [10.9, 6.1], 'mfu_logged': True}
    one = '[__recompiles] Recompiling function forward in model.py\n'
    assert all(ok for _, ok in run_checks('moe', good, one, gpu=True))

    def failed(f, log=one):
        return [what for what, ok in run_checks('moe', f, log, gpu=True) if not ok]
    assert len(failed(good, one * 2)) == 1 and len(failed(good, one + '[__graph_breaks] Graph break in')) == 1
    assert failed({**good, 'runtime': {**rt, 'moe_dispatch': 'loop'}}) == [
        'moe: MoE dispatch grouped (runtime row: loop)']
    for bad in ({'dtype': 'float32'}, {'iters': 120}, {'losses': [10.9, float('nan')]}, {'mfu_logged': False}):
        assert len(failed({**good, **bad})) == 1, bad
    # on an A100 runtime.py picks grouped_mm too (one compiled graph; its host syncs are the kernel's)
    a100 = {**rt, 'where': 'NVIDIA A100-SXM4-40GB, sm80', 'moe_dispatch': 'loop'}
    assert failed({**good, 'runtime': a100}) == ['moe: MoE dispatch grouped (runtime row: loop)']


@pytest.mark.skipif(shutil.which('bash') is None or shutil.which('timeout') is None, reason='needs bash and timeout')
def test_quick_dry_run_runs_every_step_and_summarises_it(tmp_path):
    """DRY_RUN=quick: every step as on the GPU (the CUDA tests rehearsed on the CPU, bench.py, the three training
    runs), bf16 autocast into grouped_mm, eager and tiny. The scaling step gets a 2 s cap: it is cut, and the rest
    must be kept and the check still pass (an optional step cut by its cap fails nothing)."""
    data = random_token_data(tmp_path / 'data', vocab=50257, n_tokens=20_000)   # GPT-2 ids, as the real sample
    out = tmp_path / 'out'
    env = dict(subprocess_env(), DRY_RUN='quick', DATA_DIR=data, CAP_SCALING='2', PYTHON=sys.executable)
    p = subprocess.run(['bash', SCRIPT, str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert sorted(os.listdir(out)) == ['env.txt', 'results.tar.gz', 'summary.md']
    summary = (out / 'summary.md').read_text()
    steps = dict(re.findall(r'^\| ([a-z_ ]+) \| ([^|]+) \|', summary, re.M))
    assert {k: steps[k].strip() for k in ('env', 'tests', 'bench', 'data', 'train dense', 'train moe',
                                          'train deepseek_moe')} == dict.fromkeys(
        ('env', 'tests', 'bench', 'data', 'train dense', 'train moe', 'train deepseek_moe'), 'ok')
    assert steps['scaling'].startswith('**CUT**')
    checks = re.findall(r'^- (ok|\*\*FAILED\*\*): (.*)$', summary, re.M)
    assert checks and all(v == 'ok' for v, _ in checks), checks
    assert ('ok', 'deepseek_moe: MoE dispatch grouped (runtime row: grouped)') in checks
    assert re.search(r'\d+ passed, 2 skipped', summary)                              # the rehearsed CUDA tests
    for name in ('dense', 'moe', 'deepseek_moe'):
        assert re.search(rf'^\| {name} \| ok \| 10 / 10 \|', summary, re.M), name
    with tarfile.open(out / 'results.tar.gz') as tar:
        names = tar.getnames()
    assert not [n for n in names if n.endswith('.pt')]
    for name in ('dense', 'moe', 'deepseek_moe'):
        assert f'results/runs/{name}/metrics.jsonl' in names and f'results/logs/train_{name}.log' in names


def fake_gpu_results(res, host_sync: str = 'none') -> None:
    """A results folder as bench/gpu_check.sh leaves it on an H100: every step passed."""
    import json
    (res / 'logs').mkdir(parents=True)
    steps = [('env', 0, 9.1, 15), ('tests', 0, 48.0, 75), ('bench', 0, 80.2, 110), ('data', 0, 0.4, '-')]
    steps += [(f'train {n}', 0, 30.0, 50) for n in ('dense', 'moe', 'deepseek_moe')]
    steps += [('scaling', '-', 0, 100), ('total', 0, 260.0, '-')]
    (res / 'steps.tsv').write_text('step\texit\twall_s\tcap_s\tnote\n'
                                   + ''.join(f'{a}\t{b}\t{c}\t{d}\t\n' for a, b, c, d in steps))
    (res / 'env.txt').write_text('torch: 2.11.0+cu130\ntorch.cuda.get_device_name: NVIDIA H100 80GB HBM3\n'
                                 'torch.cuda.get_device_capability: (9, 0)\n')
    (res / 'logs' / 'tests.log').write_text('[gw0] [ 10%] PASSED tests/test_cuda.py::test_x[moe]\n'
                                            '============ 8 passed in 40.2s ============\n')
    (res / 'logs' / 'bench.log').write_text('| model | ms/step |\n|---|---:|\n| dense | 20.0 |\n'
                                            f'host synchronisations in the moe forward: {host_sync}\n'
                                            'host synchronisations in the deepseek_moe forward: none\n')
    rt = {'device_type': 'cuda', 'where': 'NVIDIA H100 80GB HBM3, sm90', 'compile': True, 'moe_dispatch': 'grouped'}
    for name, ms in (('dense', 20.0), ('moe', 22.0), ('deepseek_moe', 23.0)):
        rows = [{'type': 'config', 'config': {'max_iters': 200, 'eval_iters': 20}, 'dtype': 'bfloat16',
                 'tokens_per_iter': 16384, 'runtime': rt},
                {'type': 'eval', 'iter': 0, 'val_loss': 10.9, 'elapsed_s': 12.0}]
        rows += [{'type': 'train', 'iter': it, 'loss': 8.0, 'ms_per_iter': ms * (10 if it == 20 else 1),
                  'tokens_per_s': 16384 / ms * 1000, 'mfu': 0.3} for it in range(20, 201, 20)]
        windows = 20 * 10 * ms / 1000 + 9 * 20 * ms / 1000             # the first window holds a 10x compile
        rows.append({'type': 'eval', 'iter': 200, 'val_loss': 6.0, 'elapsed_s': 12.0 + windows + 0.4})   # 0.4 s eval
        (res / 'runs' / name).mkdir(parents=True)
        (res / 'runs' / name / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
        (res / 'logs' / f'train_{name}.log').write_text(
            'device cuda (NVIDIA H100 80GB HBM3, sm90): bfloat16, compile on\n'
            '[__recompiles] Recompiling function forward in model.py\n')
        (res / f'gpu_train_{name}.csv').write_text('timestamp, utilization.gpu [%], memory.used [MiB], power\n'
                                                   't, 90, 20480, 500\nt, 95, 30720, 600\n')


def test_gpu_summary_of_a_passing_and_a_failing_h100_run(tmp_path):
    """What the GPU session will read: the training table from metrics.jsonl and nvidia-smi (peak 30 GiB, MFU 30%,
    ratio to dense), every check passing and --final 0; a host sync in the MoE forward fails the check and exits 1."""
    for host_sync, want in (('none', 0), ('SYNC: call to cudaMemcpy', 1)):
        res = tmp_path / host_sync[:4] / 'results'
        fake_gpu_results(res, host_sync)
        out = res.parent / 'summary.md'
        p = subprocess.run([sys.executable, os.path.join(REPO, 'bench', 'gpu_summary.py'), str(res), str(out),
                            '--mode', 'gpu', '--elapsed_s', '260', '--budget_s', '360', '--final'],
                           capture_output=True, text=True)
        assert p.returncode == want, p.stderr
        summary = out.read_text()
        assert summary.startswith('# GPU check: NVIDIA H100 80GB HBM3, torch 2.11.0+cu130')
        moe_row = r'^\| moe \| ok \| 200 / 200 \| 22\.0 \| 1\.100x \| 744,727 \| 30\.0% \|.*\| 30\.0 \| 30\.0 \|'
        assert re.search(moe_row, summary, re.M), summary
        # dense: 5,000 x 20 ms + 21 evals x 100 batches x 0.4 s / 40 + compile (4 s - 20 x 20 ms) + 12 s = 136.6 s
        assert re.search(r'^\| dense \| .*\| 3\.6 \| 12\.0 \| 30\.0 \| 30\.0 \| 2\.3 min \|$', summary, re.M), summary
        checks = re.findall(r'^- (ok|\*\*FAILED\*\*): (.*)$', summary, re.M)
        assert ('ok', 'deepseek_moe: MFU logged (the GPU is in runtime.GPU_PEAK_FLOPS)') in checks
        assert [what for ok, what in checks if ok != 'ok'] == (
            [] if want == 0 else [f'host synchronisations in the moe forward: {host_sync}'])
        assert '(not run: )' not in summary and 'could not be made' not in summary
