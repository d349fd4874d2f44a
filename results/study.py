"""
Run the training runs of a study, resumably, one per CPU core: every run pinned to its core (taskset) with one
thread, so that two runs never share a core. A finished run is skipped, an interrupted one resumes from its
checkpoint, and each finished run's metrics.jsonl is copied to <study>/runs/<name>/ for compare.py.

    python results/study.py results/cpu/runs.txt                 # cores 0 and 1, in the file's order
    python results/study.py results/balance/runs.txt --cpus 1    # one core
    python results/study.py results/cpu/runs.txt --only deepseek_moe,moe   # those groups' runs only

A runs file holds one run per line: its name, then train.py's arguments (config files, --key=value); '#' starts
a comment. Run directories (checkpoints) go to out-study/<study>/<name>/ and their logs beside them. On Linux
the glibc settings of bench/RESULTS.md are set for every run (they change no number, only the speed). Several
study.py processes may share a runs file (one per core, say): each run is locked while it trains, and a
process skips the runs another one holds.
"""

import argparse
import fcntl
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get('SHARED', os.path.join(REPO, '..', 'shared'))


def run_group(name: str) -> str:
    """The group of a run: its name without the trailing -s<seed> ('deepseek_moe' for deepseek_moe-s3)."""
    return re.sub(r'-s\d+$', '', name)


def read_runs(path: str) -> list[tuple[str, list[str]]]:
    """(name, train.py arguments) of every run in a runs file."""
    runs = []
    with open(path) as f:
        for line in f:
            words = line.split('#', 1)[0].split()
            if words:
                runs.append((words[0], words[1:]))
    names = [name for name, _ in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: run names repeat: {sorted(n for n in set(names) if names.count(n) > 1)}")
    return runs


def finished(run_dir: str) -> bool:
    """A run is finished when its metrics hold the evaluation at max_iters (of its latest config row)."""
    path = os.path.join(run_dir, 'metrics.jsonl')
    if not os.path.isfile(path):
        return False
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass                                     # a line cut off by a kill
    configs = [r for r in rows if r.get('type') == 'config']
    if not configs:
        return False
    max_iters = configs[-1]['config']['max_iters']
    return any(r.get('type') == 'eval' and r['iter'] == max_iters and not r.get('eval_only') for r in rows)


def prepare_data() -> None:
    """The compact-vocabulary TinyStories sample the CPU studies train on, if it is not there yet."""
    folder = os.path.join(REPO, 'data', 'tinystories_v4096')
    if all(os.path.isfile(os.path.join(folder, f)) for f in ('train.bin', 'val.bin', 'meta.pkl')):
        return
    src = os.path.join(SHARED, 'data', 'tinystories')
    subprocess.run([sys.executable, 'data/tinystories/prepare.py', '--input', os.path.join(src, 'train.txt'),
                    '--val-input', os.path.join(src, 'val.txt'), '--vocab', '4096'], cwd=REPO, check=True)


def run_one(name: str, args: list[str], study: str, cpu: str, log) -> str:
    """Train one run to its end (resuming if it was cut off) and copy its metrics: 'done', 'failed' (train.py
    failed), or 'elsewhere' (another process holds the run's lock)."""
    run_dir = os.path.join(REPO, 'out-study', study, name)
    results = os.path.join(REPO, 'results', study, 'runs', name)
    os.makedirs(os.path.dirname(run_dir), exist_ok=True)
    with open(run_dir + '.lock', 'w') as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)   # released when this process ends, however it ends
        except BlockingIOError:
            log(f"{name}: running in another process, skipped")
            return 'elsewhere'
        return train_to_end(name, args, run_dir, results, cpu, log, lock)


def train_to_end(name: str, args: list[str], run_dir: str, results: str, cpu: str, log, lock) -> str:
    if finished(run_dir):
        log(f"{name}: finished, skipped")
    else:
        init = 'resume' if os.path.isfile(os.path.join(run_dir, 'ckpt.pt')) else 'scratch'
        # a resume takes its settings from the checkpoint: only the arguments that say where and how
        cmd = (['taskset', '-c', cpu, sys.executable, 'train.py'] + (args if init == 'scratch' else [])
               + [f'--out_dir={run_dir}', f'--init_from={init}'])
        log(f"{name} ({init}) on cpu {cpu}")
        start = time.time()
        with open(run_dir + '.log', 'a') as out:
            # train.py inherits the lock: if this process is killed, the run stays locked until train.py ends too
            status = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=run_env(),
                                    pass_fds=(lock.fileno(),)).returncode
        if status or not finished(run_dir):
            log(f"{name}: train.py failed ({status}); see {run_dir}.log")
            return 'failed'
        log(f"{name}: done in {time.time() - start:.0f} s")
    os.makedirs(results, exist_ok=True)
    shutil.copy(os.path.join(run_dir, 'metrics.jsonl'), os.path.join(results, 'metrics.jsonl'))
    return 'done'


def run_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1',
               MALLOC_MMAP_THRESHOLD_='4294967296', MALLOC_TRIM_THRESHOLD_='68719476736')
    cache = os.path.join(SHARED, 'tiktoken_cache')
    if os.path.isdir(cache):
        env.setdefault('TIKTOKEN_CACHE_DIR', os.path.abspath(cache))
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('runs', help="a runs file, results/<study>/runs.txt")
    parser.add_argument('--cpus', default='0,1', help="the cores to run on, one run per core (default 0,1)")
    parser.add_argument('--only', default='', help="comma-separated groups (run names without -s<seed>) to run, "
                                                    "e.g. deepseek_moe,moe; default: every run of the file")
    args = parser.parse_args()
    study = os.path.basename(os.path.dirname(os.path.abspath(args.runs)))
    try:
        runs = read_runs(args.runs)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    if args.only:
        only = args.only.split(',')
        unknown = sorted(set(only) - {run_group(name) for name, _ in runs})
        if unknown:
            sys.exit(f"error: --only names {', '.join(unknown)}, which {args.runs} has no runs of")
        runs = [(name, run_args) for name, run_args in runs if run_group(name) in only]
    prepare_data()
    lock = threading.Lock()

    def log(message: str) -> None:
        with lock:
            print(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {message}", flush=True)
    todo = queue.Queue()
    for run in runs:
        todo.put(run)
    outcome = {}

    def worker(cpu: str) -> None:
        while True:
            try:
                name, run_args = todo.get_nowait()
            except queue.Empty:
                return
            outcome[name] = run_one(name, run_args, study, cpu, log)
    threads = [threading.Thread(target=worker, args=(cpu,)) for cpu in args.cpus.split(',')]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = [n for n, o in outcome.items() if o == 'failed']
    elsewhere = [n for n, o in outcome.items() if o == 'elsewhere']
    if failed:
        sys.exit(f"error: {len(failed)} run(s) failed: {', '.join(failed)}")
    log(f"{len(runs) - len(elsewhere)} of the {len(runs)} runs of {study} finished"
        + (f"; {', '.join(elsewhere)} still running in another process" if elsewhere else ''))


if __name__ == '__main__':
    main()
