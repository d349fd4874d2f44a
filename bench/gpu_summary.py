"""
OUTDIR/summary.md of bench/gpu_check.sh, from what its steps have left so far in its results folder:

    python bench/gpu_summary.py RESULTS_DIR OUT.md --mode gpu|full|quick --elapsed_s 123.4 --budget_s 360 [--final]

bench/gpu_check.sh calls it after every step, so a check cut off at any point keeps a summary of what ran. The
figures of the training runs come from their metrics.jsonl (run_figures); the checks say whether the run took the
path it should have (bf16, compiled, grouped_mm). With --final it exits 1 if a step failed or a
check did not pass. Standard library only: it must run where torch is broken too.
"""

import argparse
import csv
import json
import math
import os
import re
import statistics
import sys

CONFIGS = ('dense', 'moe', 'deepseek_moe')
# The Quickstart run that the short runs project to: train.py's defaults (tests/test_gpu_check.py checks them)
QUICKSTART_ITERS = 5000
QUICKSTART_EVAL_INTERVAL = 250
QUICKSTART_EVAL_ITERS = 50


def read(path: str, default: str = '') -> str:
    try:
        with open(path, errors='replace') as f:
            return f.read()
    except OSError:
        return default


def read_rows(path: str) -> list[dict]:
    """The rows of a metrics.jsonl; a line cut by a kill is skipped."""
    rows = []
    for line in read(path).splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


def verdict(rc: str, cap: str) -> str:
    return {'0': 'ok', '124': f'**CUT** by its {cap} s cap', '137': f'**KILLED** ({cap} s cap + 5 s)',
            '-': 'not run'}.get(rc, f'**FAILED** (exit {rc})')


def fmt(v, spec: str, unit: str = '') -> str:
    return format(v, spec) + unit if isinstance(v, (int, float)) and math.isfinite(v) else '-'


def median(values) -> float | None:
    values = [v for v in values if isinstance(v, (int, float))]
    return statistics.median(values) if values else None


def n_evals(max_iters: int, eval_interval: int) -> int:
    """Evaluations in a run: at every multiple of eval_interval from 0 to max_iters, and at the end."""
    return max_iters // eval_interval + 1 + (1 if max_iters % eval_interval else 0)


def projected_run_s(ms_per_iter: float, eval_batch_s: float, compile_s: float, max_iters: int = QUICKSTART_ITERS,
                    eval_interval: int = QUICKSTART_EVAL_INTERVAL, eval_iters: int = QUICKSTART_EVAL_ITERS) -> float:
    """Seconds of a run of max_iters: its steps at the steady rate, its evaluations (each eval_iters forward
    batches of the train and of the val split) at the measured rate, and the compile once. Checkpoint writes are
    not counted."""
    evals_s = n_evals(max_iters, eval_interval) * 2 * eval_iters * eval_batch_s
    return max_iters * ms_per_iter / 1000 + evals_s + compile_s


def run_figures(rows: list[dict]) -> dict:
    """A run's figures from its metrics.jsonl rows. Steady ms/iter, tokens/s and MFU are medians over the log
    windows after the first, which holds the compile of the training graph; that compile is the first window's
    time beyond its iterations at the steady rate. The eval at iteration 0 compiles the eval graph (its time is
    elapsed_s of that row). The last eval's time is what is left of the time between the two evals once the
    windows are taken out (train.py restarts its window clock after each eval)."""
    cfg = next((r for r in rows if r.get('type') == 'config'), {})
    settings = cfg.get('config', {})
    trains = [r for r in rows if r.get('type') == 'train']
    evals = [r for r in rows if r.get('type') == 'eval']
    f = {'max_iters': settings.get('max_iters'), 'iters': trains[-1]['iter'] if trains else 0,
         'runtime': cfg.get('runtime', {}), 'dtype': cfg.get('dtype'), 'tokens_per_iter': cfg.get('tokens_per_iter'),
         'active_params': cfg.get('active_params'), 'total_params': cfg.get('total_params'),
         'losses': [r.get('loss') for r in trains], 'val_losses': [r.get('val_loss') for r in evals],
         'last_eval': evals[-1] if evals else {}}
    steady = trains[1:]
    f['ms'] = median(r.get('ms_per_iter') for r in steady)
    f['tokens_s'] = median(r.get('tokens_per_s') for r in steady)
    f['mfu'] = median(r.get('mfu') for r in steady)
    f['mfu_logged'] = bool(trains) and all('mfu' in r for r in trains)
    windows, prev = [], 0
    for r in trains:
        windows.append(r['ms_per_iter'] / 1000 * (r['iter'] - prev))
        prev = r['iter']
    f['compile_train_s'] = f['eval0_s'] = f['eval_batch_s'] = f['projected_s'] = None
    if trains and f['ms'] is not None:
        f['compile_train_s'] = max(0.0, windows[0] - trains[0]['iter'] * f['ms'] / 1000)
    if evals and evals[0].get('iter') == 0:
        f['eval0_s'] = evals[0].get('elapsed_s')
    if len(evals) >= 2 and evals[-1].get('iter') == f['iters'] and evals[0].get('iter') == 0:
        last_eval_s = evals[-1]['elapsed_s'] - evals[0]['elapsed_s'] - sum(windows)
        eval_iters = settings.get('eval_iters')
        if eval_iters and last_eval_s > 0:
            f['eval_batch_s'] = last_eval_s / (2 * eval_iters)
    if None not in (f['ms'], f['eval_batch_s'], f['compile_train_s'], f['eval0_s']):
        f['projected_s'] = projected_run_s(f['ms'], f['eval_batch_s'], f['compile_train_s'] + f['eval0_s'])
    return f


def expects_grouped(runtime: dict) -> bool:
    """Whether runtime.choose_runtime should have picked grouped_mm for a bf16 run: on the CPU, and on CUDA from
    sm80 (its fast kernel is sm90/sm100's; below, one compiled graph all the same)."""
    if runtime.get('device_type') == 'cpu':
        return True
    sm = re.search(r'\bsm(\d+)\b', runtime.get('where', ''))
    return bool(sm) and int(sm.group(1)) >= 80


def run_checks(name: str, f: dict, log: str, gpu: bool, compiled: bool = True) -> list[tuple[str, bool]]:
    """What a training run must show: it ran to the end on the path asked for (bf16; compiled, but in the quick
    dry run), with finite losses."""
    rt = f['runtime']
    if not rt:
        return [(f'{name}: started (its metrics.jsonl has a config row)', False)]
    checks = [(f'{name}: reached iteration {f["max_iters"]}', f['iters'] == f['max_iters'] and f['iters'] > 0),
              (f'{name}: bfloat16 autocast', f['dtype'] == 'bfloat16'),
              (f'{name}: {"compiled" if compiled else "eager (the quick dry run)"}', rt.get('compile') is compiled),
              (f'{name}: losses finite', bool(f['losses']) and all(isinstance(v, (int, float)) and math.isfinite(v)
                                                                     for v in f['losses'] + f['val_losses'])),
              # train.py's eval at iteration 0 compiles the eval graph, its first step recompiles for training
              # (grad mode); any other recompile, or a graph break, is a bug (TORCH_LOGS=recompiles,graph_breaks)
              (f'{name}: one recompile at most (eval, then training) and no graph break in the log',
               len(re.findall(r'Recompiling function', log)) <= (1 if compiled else 0)
               and not re.search(r'__graph_breaks|recompile_limit', log))]
    if name != 'dense' and rt:
        want = 'grouped' if expects_grouped(rt) else rt.get('moe_dispatch')
        checks.append((f'{name}: MoE dispatch {want} (runtime row: {rt.get("moe_dispatch")})',
                       rt.get('moe_dispatch') == want))
    if gpu:
        checks.append((f'{name}: MFU logged (the GPU is in runtime.GPU_PEAK_FLOPS)', f['mfu_logged']))
    return checks


def gpu_load(path: str) -> tuple[float | None, float | None, int]:
    """Mean utilisation (%) and max memory used (GiB) of an nvidia-smi CSV, and its sample count."""
    util, mem = [], []
    for row in list(csv.reader(read(path).splitlines()))[1:]:
        try:
            util.append(float(row[1]))
            mem.append(float(row[2]))
        except (ValueError, IndexError):
            pass
    return (statistics.mean(util) if util else None, max(mem) / 1024 if mem else None, len(util))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('res')
    parser.add_argument('out')
    parser.add_argument('--mode', choices=['gpu', 'full', 'quick'], required=True)
    parser.add_argument('--elapsed_s', type=float, required=True)
    parser.add_argument('--budget_s', type=float, required=True)
    parser.add_argument('--final', action='store_true')
    args = parser.parse_args()
    res, gpu = args.res, args.mode == 'gpu'
    with open(os.path.join(res, 'steps.tsv')) as fh:
        steps = list(csv.DictReader(fh, delimiter='\t'))
    by_step = {s['step']: s for s in steps}
    env = read(os.path.join(res, 'env.txt'))
    out, checks = [], []
    w = out.append

    def section(title, fn):
        w(f'\n## {title}\n')
        try:
            fn()
        except Exception as e:                # a summary must always be written: say what could not be read
            w(f'(this section could not be made: {type(e).__name__}: {e})')

    device = re.search(r'^torch.cuda.get_device_name: (.*)$', env, re.M)
    torch_v = re.search(r'^torch: (.*)$', env, re.M)
    w(f"# GPU check: {device.group(1) if device else 'no GPU'}, torch {torch_v.group(1) if torch_v else '?'}"
      + {'gpu': '', 'full': ' (DRY RUN on the CPU: bf16, compiled, every size shrunk)',
         'quick': ' (QUICK DRY RUN on the CPU: bf16, eager, every size shrunk)'}[args.mode] + '\n')
    w(f"Written by bench/gpu_check.sh after {args.elapsed_s:.0f} s of its {args.budget_s:.0f} s budget"
      + (' (the end)' if args.final else ' (it was still running: later steps may be missing)') + '. '
      + ('A speed check, not the comparison: ' if gpu else 'What the CPU rehearses is that every step runs on '
         'the path the GPU will take; none of its times says anything about the GPU. ')
      + ('bench.py gives the step and layer costs against dense of the same active width; the training runs give '
         'the speed of train.py itself over its first iterations. No loss here compares the models.' if gpu else ''))

    def steps_table():
        w('| step | result | exit | wall s | cap s | note |\n|---|---|---:|---:|---:|---|')
        for s in steps:
            w(f"| {s['step']} | {verdict(s['exit'], s['cap_s'])} | {s['exit']} | {s['wall_s']} | {s['cap_s']} | "
              f"{s['note']} |")

    def env_lines():
        keep = [line for line in env.splitlines() if line and not line.startswith(' ') and ':' in line][:40]
        w('```\n' + '\n'.join(keep) + '\n```' if keep else '(no env.txt yet)')

    def tests():
        lines = read(os.path.join(res, 'logs', 'tests.log')).splitlines()
        results = [line for line in lines if '::' in line and re.search(r'\b(PASSED|FAILED|ERROR|SKIPPED)\b', line)]
        final = [line for line in lines if re.search(r'\d+ (passed|failed|skipped|errors?|deselected)', line)]
        w('```\n' + '\n'.join(results[:40] + final[-1:]) + '\n```' if results or final else '(no test result yet)')
        step = by_step.get('tests')
        if step and step['exit'] not in ('0', '-'):
            w('\nThe last lines of its log:\n```\n' + '\n'.join(lines[-12:]) + '\n```')
        errors = [line for line in lines if line.startswith('E ')][:15]
        if errors:
            w('\nFirst assertion lines:\n```\n' + '\n'.join(errors) + '\n```')
        if step and step['exit'] != '-':
            passed = bool(final) and not re.search(r'\d+ (failed|error)', final[-1])
            checks.append(('tests/test_cuda.py: none failed', passed))
            if gpu:                       # all skipped passes too: the GPU must have been seen
                checks.append(('tests/test_cuda.py: none skipped for want of a GPU',
                               not any('needs a CUDA GPU' in line for line in lines)))
        if not gpu:
            w('\nOn the CPU these are the rehearsal (TEST_CUDA_DEVICE=cpu): the same tests in bf16 on the CPU, the '
              'CUDA-only ones skipped.')

    def bench(step_name, log_name):
        lines = read(os.path.join(res, 'logs', log_name)).splitlines()
        keep = []
        for i, line in enumerate(lines):          # its tables and result lines, not the warnings around them
            if line.startswith(('|', '## ', 'torch ', 'scaling from', 'host synchronisations', 'first step', 'error')):
                header = line.startswith('|') and i + 1 < len(lines) and lines[i + 1].startswith('|---')
                if keep and (header or not line.startswith('|')):
                    keep.append('')
                keep.append(line.replace('## ', '### ', 1) if line.startswith('## ') else line)
        w('\n'.join(keep) if keep else '(no table yet)')
        step = by_step.get(step_name)
        if step and step['exit'] not in ('0', '-'):
            w(f"\nbench.py did not finish ({verdict(step['exit'], step['cap_s'])}); the last lines of its log:\n```\n"
              + '\n'.join(lines[-10:]) + '\n```')
        # grouped_mm queues its work without the host on sm90/sm100 only (below, it copies the offsets to the host)
        cap = re.search(r'^torch.cuda.get_device_capability: \((\d+), \d+\)$', env, re.M)
        if gpu and step and step['exit'] == '0' and step_name == 'bench' and cap and int(cap.group(1)) in (9, 10):
            for line in lines:
                if line.startswith('host synchronisations'):
                    checks.append((line, line.endswith(': none')))
        if step_name == 'bench':
            w('\nStep: forward, backward and AdamW of the whole model; layer: one FFN alone, forward and backward. '
              'Each MoE is timed against dense of the same active FFN width, interleaved round by round in one '
              'process, the median of the per-round ratios. MFU counts active parameters (6N per token plus '
              'attention) over the GPU\'s dense bf16 peak (runtime.GPU_PEAK_FLOPS). The first step of each model '
              'holds its compile from a cold cache, which also fills inductor\'s cache for the training runs. '
              'Shows: what the MoE costs over dense in this code, compiled, at this size, on this GPU. '
              'Does not show: other sizes, several GPUs, or anything about loss.'
              + ('' if gpu else ' In a dry run every time is a CPU\'s at a toy size and means nothing.'))

    def training():
        w('| run | result | iters | ms/iter | vs dense | tokens/s | MFU | train-graph compile s | eval at 0 s '
          '(its compile) | peak GPU memory GiB | wall s | projected 5,000 iters |')
        w('|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|')
        figures, notes = {}, []
        for name in CONFIGS:
            s = by_step.get(f'train {name}')
            f = figures[name] = run_figures(read_rows(os.path.join(res, 'runs', name, 'metrics.jsonl')))
            dense_ms = figures['dense']['ms']
            _, mem, _ = gpu_load(os.path.join(res, f'gpu_train_{name}.csv'))
            proj = f['projected_s']
            w(f"| {name} | {verdict(s['exit'], s['cap_s']) if s else 'not run yet'} | "
              f"{f['iters']} / {f['max_iters'] or '-'} | "
              f"{fmt(f['ms'], '.1f')} | {fmt(f['ms'] / dense_ms if f['ms'] and dense_ms else None, '.3f', 'x')} | "
              f"{fmt(f['tokens_s'], ',.0f')} | {fmt(100 * f['mfu'] if f['mfu'] is not None else None, '.1f', '%')} | "
              f"{fmt(f['compile_train_s'], '.1f')} | {fmt(f['eval0_s'], '.1f')} | {fmt(mem, '.1f')} | "
              f"{s['wall_s'] if s else '-'} | {fmt(proj / 60 if proj else None, '.1f', ' min')} |")
            if not s or s['exit'] == '-':
                continue
            log = read(os.path.join(res, 'logs', f'train_{name}.log'))
            lines = log.splitlines()
            notes.append(f"- {name}: `{lines[0] if lines else '(no output)'}`")
            last = f['last_eval']
            if last:
                maxvio = last.get('maxvio_global')
                notes.append(f"  - eval {last.get('iter')}: train loss {fmt(last.get('train_loss'), '.4f')}, val loss "
                             f"{fmt(last.get('val_loss'), '.4f')}"
                             + (f", maxvio_global {fmt(statistics.mean(maxvio), '.3f')}" if maxvio else ''))
            if s['exit'] not in ('0', '-'):
                notes.append('  - last lines:\n```\n' + '\n'.join(lines[-8:]) + '\n```')
            checks.extend(run_checks(name, f, log, gpu, compiled=args.mode != 'quick'))
        w('\n' + '\n'.join(notes))
        tokens = figures['dense']['tokens_per_iter'] or figures['deepseek_moe']['tokens_per_iter']
        iters = figures['dense']['max_iters']
        w(f"\nWhat these runs are: train.py as the Quickstart runs it (the same settings, compiled, bf16"
          + ('' if gpu else '; in this dry run shrunk' + (', and eager' if args.mode == 'quick' else ''))
          + "), stopped "
          f"after {iters or '?'} iterations of {fmt(tokens, ',')} tokens and evaluated at 0 and at the end; "
          f"the learning rate is still warming up, so these are exactly the Quickstart runs' first iterations. "
          f"Steady ms/iter, tokens/s and MFU are medians over the log windows after the first (which holds the "
          f"compile; "
          f"MFU as in bench.py); 'vs dense' is the ratio of two separate runs, not interleaved: bench.py's ratio is "
          f"the better one. A training step also loads its batch, syncs once with the host, clips and updates the "
          f"balancing biases, so it is slower than bench.py's step. The training graph's compile comes from "
          f"inductor's cache that bench.py filled (its cold compile is bench.py's first step); the eval graph's is "
          f"cold. Peak GPU memory is nvidia-smi's memory.used (the CUDA context and PyTorch's cached blocks "
          f"included), sampled each second. Projected 5,000 iterations = 5,000 x ms/iter + "
          f"{n_evals(QUICKSTART_ITERS, QUICKSTART_EVAL_INTERVAL)} "
          f"evaluations of 2 x {QUICKSTART_EVAL_ITERS} batches at the rate of the last eval here + both compiles; "
          f"checkpoint writes (about 0.8 GB for the MoE models, 0.4 GB dense, at every improving eval) not counted.\n\n"
          f"What they do not show: which model is better. The losses are after at most one pass over the 3.3M-token "
          f"TinyStories sample, a sanity check (finite, falling) and nothing more; the Quickstart's comparison needs "
          f"its 82M tokens of the full TinyStories (0.17 passes), which this check does not have.")

    def scaling():
        if by_step.get('scaling', {}).get('exit', '-') == '-':
            note = by_step['scaling']['note'] if 'scaling' in by_step else 'not reached yet'
            w('(not run' + (f': {note}' if note else '') + ')')
            return
        bench('scaling', 'scaling.log')

    def checks_list():
        if not checks:
            w('(none yet)')
        for what, ok in checks:
            w(f"- {'ok' if ok else '**FAILED**'}: {what}")

    section('Steps', steps_table)
    section('Environment', env_lines)
    section('CUDA tests (tests/test_cuda.py)', tests)
    section('bench.py at the Quickstart size' + ('' if gpu else ' (shrunk)'), lambda: bench('bench', 'bench.log'))
    section('Training: a speed check of train.py, not the comparison', training)
    section('Expert-count slope (bench.py, only if time was left)', scaling)
    section('Checks', checks_list)
    w('\n## Files\n\nresults.tar.gz holds logs/ (every step\'s output), runs/<config>/metrics.jsonl, gpu_*.csv '
      '(nvidia-smi each second), env.txt and steps.tsv. No checkpoint comes back.')
    with open(args.out + '.tmp', 'w') as fh:
        fh.write('\n'.join(out) + '\n')
    os.replace(args.out + '.tmp', args.out)
    # the optional scaling step may be cut by its cap (time ran short) without failing the check
    failed_steps = [s['step'] for s in steps if s['exit'] not in ('0', '-')
                    and not (s['step'] == 'scaling' and s['exit'] in ('124', '137'))]
    failed_checks = [what for what, ok in checks if not ok]
    if args.final and (failed_steps or failed_checks):
        print(f"gpu_summary: {len(failed_steps)} step(s) failed {failed_steps}, {len(failed_checks)} check(s) failed",
              file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    try:
        sys.exit(main())
    except Exception:                 # exit 1 means 'a check failed': a crash of this script must read otherwise
        import traceback
        traceback.print_exc()
        sys.exit(3)
