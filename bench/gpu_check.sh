#!/usr/bin/env bash
# bench/gpu_check.sh OUTDIR: everything a lent GPU should run, in one command, each step under its own time cap
# (a slow step cannot eat the others), going on past a failed step, and always ending with OUTDIR/summary.md:
#   1. env.txt (nvidia-smi, python/torch/triton versions, device name, capability); pytest tests/test_cuda.py
#   2. python bench.py --device cuda --sizes 6x384     (step and layer cost against dense, MFU, 8/64/256 slope)
#   3. python train.py config/{dense,moe,deepseek_moe}.py, 5,000 iterations each, bf16 and compile by default,
#      on the TinyStories sample, side by side on the one GPU (three in a row cannot fit the cap)
#   4. python compare.py on the three runs
#   5. OUTDIR/summary.md: exit codes, wall times, the figures from the logs; the rest in OUTDIR/results.tar.gz
#
# The device tool call (one H200; 15 minutes of device time in all, the machine's start included):
#   command:   bash bench/gpu_check.sh $OUT
#   carry:     ["data/tinystories/train.bin", "data/tinystories/val.bin"]
#   timeout_s: 590
# The step caps add up to 540 s (CAP_* below; the summary names any step its cap cut). The carried files are
# git-ignored; make them here first (about 2 s, 8 MB):
#   TIKTOKEN_CACHE_DIR=../shared/tiktoken_cache python data/tinystories/prepare.py \
#       --input ../shared/data/tinystories/train.txt --val-input ../shared/data/tinystories/val.txt
# What comes back: OUTDIR/summary.md, OUTDIR/env.txt and OUTDIR/results.tar.gz (logs, metrics.jsonl, compare
# output, GPU load; never a checkpoint). The device tool returns at most 8 files, so the runs and their
# checkpoints live in a scratch folder outside OUTDIR, and OUTDIR holds those three files at every moment:
# they are refreshed after every step, so even a command killed at its limit brings back what had finished.
#
# Dry run on the CPU, the very same steps with every one shrunk (device cpu, compile off, tiny sizes, 20
# iterations; a few minutes on 2 cores):
#   DRY_RUN=1 bash bench/gpu_check.sh /tmp/gpu_dry
# Settings (environment): DRY_RUN=1; PYTHON (default: the first of python3, python that imports torch);
# DATA_DIR (default data/tinystories); TRAIN_MODE=parallel|sequential; CAP_ENV, CAP_TESTS, CAP_BENCH,
# CAP_TRAIN (all three runs together), CAP_COMPARE in seconds; KEEP_WORK=1 keeps the scratch folder.

set -u
set -o pipefail

usage="usage: [DRY_RUN=1] bash bench/gpu_check.sh OUTDIR"
if [ $# -ne 1 ]; then
  echo "$usage" >&2
  exit 2
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "$1" && cd "$1" && pwd)" || { echo "error: cannot create OUTDIR $1" >&2; exit 2; }
for f in "$OUT"/* "$OUT"/.[!.]*; do   # OUTDIR may hold only what an earlier run of this script left
  [ -e "$f" ] || continue
  case "$(basename "$f")" in
    summary.md|env.txt|results.tar.gz) rm -f "$f" ;;
    *) echo "error: OUTDIR $OUT holds $(basename "$f"); give an empty or new folder" >&2; exit 2 ;;
  esac
done
cd "$REPO" || exit 2

DRY_RUN="${DRY_RUN:-0}"
DATA_DIR="${DATA_DIR:-$REPO/data/tinystories}"
TRAIN_MODE="${TRAIN_MODE:-parallel}"
CAP_ENV="${CAP_ENV:-15}"
CAP_TESTS="${CAP_TESTS:-120}"
CAP_BENCH="${CAP_BENCH:-150}"
CAP_TRAIN="${CAP_TRAIN:-225}"
CAP_COMPARE="${CAP_COMPARE:-30}"
CONFIGS="dense moe deepseek_moe"
export PYTHONUNBUFFERED=1
if [ -z "${TIKTOKEN_CACHE_DIR:-}" ] && [ -d "$REPO/../shared/tiktoken_cache" ]; then
  export TIKTOKEN_CACHE_DIR="$REPO/../shared/tiktoken_cache"     # GPT-2 BPE files offline (not needed to train)
fi
case "$TRAIN_MODE" in parallel|sequential) ;; *) echo "error: TRAIN_MODE must be parallel or sequential" >&2; exit 2 ;; esac

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import torch' >/dev/null 2>&1; then
      PY="$candidate"
      break
    fi
  done
fi
if [ -z "$PY" ]; then
  PY=python3
  echo "warning: neither python3 nor python imports torch; every step will fail" >&2
fi

# scratch folder for the runs (checkpoints of ~0.5 GB each, rewritten at every improving eval): RAM where
# there is room, so the fsync of every save costs nothing; never inside OUTDIR
if [ -n "${GPU_CHECK_WORK:-}" ]; then
  WORK="$GPU_CHECK_WORK"
  mkdir -p "$WORK"
elif [ -d /dev/shm ] && [ "$(df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 {print $4}')" -gt 16000000 ] 2>/dev/null; then
  WORK="$(mktemp -d /dev/shm/gpu_check.XXXXXX)"
else
  WORK="$(mktemp -d /tmp/gpu_check.XXXXXX)"
fi
RES="$WORK/results"                      # what goes into results.tar.gz
LOGS="$RES/logs"
RUNS="$WORK/runs"                        # run dirs: metrics.jsonl is copied to $RES/runs, ckpt.pt stays here
mkdir -p "$LOGS" "$RES/runs" "$RUNS" || exit 2
STEPS="$RES/steps.tsv"                   # one line per step: name, exit code, wall seconds, cap, note
printf 'step\texit\twall_s\tcap_s\tnote\n' >"$STEPS"
T_START="$(date +%s.%N)"
MONITOR_PID=""

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
say() { echo "[gpu_check $(date +%H:%M:%S)] $*"; }

record() {   # record NAME EXIT WALL CAP NOTE
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5:-}" >>"$STEPS"
  local verdict="exit $2"
  [ "$2" = 0 ] && verdict=ok
  [ "$2" = 124 ] && verdict="CUT by its ${4}s cap"
  [ "$2" = 137 ] && verdict="KILLED ${4}s cap + 5 s"
  [ "$2" = - ] && verdict="not run"
  say "$1: $verdict (${3}s)${5:+; $5}"
}

run_step() {   # run_step NAME CAP LOG COMMAND...: the command under timeout, its output in LOG
  local name="$1" cap="$2" log="$3"
  shift 3
  local t0 rc
  t0="$(now)"
  say "$name: $* (cap ${cap}s)"
  timeout -k 5 "$cap" "$@" >"$log" 2>&1
  rc=$?
  record "$name" "$rc" "$(elapsed "$t0" "$(now)")" "$cap"
  refresh
  return "$rc"
}

start_monitor() {   # start_monitor NAME: GPU load and memory every second, until stop_monitor
  if [ "$DRY_RUN" != 1 ] && command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,power.draw --format=csv,nounits -l 1 \
      >"$RES/gpu_load_$1.csv" 2>/dev/null &
    MONITOR_PID=$!
  fi
}

stop_monitor() {
  if [ -n "$MONITOR_PID" ]; then
    kill "$MONITOR_PID" 2>/dev/null
    wait "$MONITOR_PID" 2>/dev/null
    MONITOR_PID=""
  fi
}

# -----------------------------------------------------------------------------------------------------------
# summary.md and the tarball, rewritten after every step

write_summary() {
  timeout 60 "$PY" - "$RES" "$OUT/summary.md" "$DRY_RUN" "$TRAIN_MODE" "$(elapsed "$T_START" "$(now)")" \
      "$CAP_TRAIN" <<'PYEOF'
import csv, glob, json, os, re, statistics, sys

res, path, dry, mode, total_s, cap_train = sys.argv[1:7]
dry = dry == '1'
out = []
w = out.append


def read(p, default=''):
    try:
        with open(p, errors='replace') as f:
            return f.read()
    except OSError:
        return default


def verdict(rc, cap):
    return {'0': 'ok', '124': f'**CUT** by its {cap} s cap', '137': f'**KILLED** ({cap} s cap + 5 s)',
            '-': 'not run'}.get(rc, f'**FAILED** (exit {rc})')


def section(title, fn):
    w(f'\n## {title}\n')
    try:
        fn()
    except Exception as e:           # a summary must always be written: say what could not be read
        w(f'(this section could not be made: {type(e).__name__}: {e})')


with open(os.path.join(res, 'steps.tsv')) as f:
    steps = list(csv.DictReader(f, delimiter='\t'))
env = read(os.path.join(res, 'env.txt'))
gpu = re.search(r'^torch.cuda.get_device_name: (.*)$', env, re.M)
w(f"# GPU check{' (DRY RUN on the CPU: every step shrunk)' if dry else ''}: "
  f"{gpu.group(1) if gpu else 'no GPU'}\n")
w(f"Written by bench/gpu_check.sh after {total_s} s; {len(steps)} steps recorded so far. "
  f"Training runs: {mode}" + (' (three processes shared the one GPU: each run\'s tokens/s and MFU are its share, '
                              'not what it gets alone)' if mode == 'parallel' else ' (one after another)') + '.')


def steps_table():
    w('| step | result | exit | wall s | cap s | note |\n|---|---|---:|---:|---:|---|')
    for s in steps:
        w(f"| {s['step']} | {verdict(s['exit'], s['cap_s'])} | {s['exit']} | {s['wall_s']} | {s['cap_s']} | {s['note']} |")


def env_lines():
    keep = [l for l in env.splitlines() if l and not l.startswith(' ') and ':' in l][:30]
    w('```\n' + '\n'.join(keep) + '\n```' if keep else '(no env.txt)')


def tests():
    log = read(os.path.join(res, 'logs', 'tests.log'))
    lines = log.splitlines()
    results = [l for l in lines if re.search(r'(PASSED|FAILED|ERROR|SKIPPED|XFAIL)', l) and '::' in l]
    final = [l for l in lines if re.search(r'\d+ (passed|failed|skipped|error)', l)]
    w('```\n' + '\n'.join(results[:40] + final[-1:]) + '\n```' if results or final else '(no test result in the log)')
    step = next((s for s in steps if s['step'] == 'tests'), None)
    if step and step['exit'] != '0' and not final:
        w(f"\npytest did not finish ({verdict(step['exit'], step['cap_s'])}); the last lines of its log:\n```\n"
          + '\n'.join(lines[-10:]) + '\n```')
    errors = [l for l in lines if l.startswith('E ')][:15]
    if errors:
        w('\nFirst assertion lines:\n```\n' + '\n'.join(errors) + '\n```')
    durations = [l for l in lines if re.match(r'^\d+\.\d+s (call|setup|teardown)', l)][:8]
    if durations:
        w('\nSlowest:\n```\n' + '\n'.join(durations) + '\n```')


def bench():
    log = read(os.path.join(res, 'logs', 'bench.log'))
    keep = []
    lines = log.splitlines()
    for i, l in enumerate(lines):             # its tables and result lines, not the warnings around them
        if l.startswith(('|', '## ', 'torch ', 'scaling from', 'host synchronisations', 'error')):
            header = l.startswith('|') and i + 1 < len(lines) and lines[i + 1].startswith('|---')
            if keep and (header or not l.startswith('|')):
                keep.append('')               # a blank line around headings and tables, for markdown
            keep.append(l)
    w('\n'.join(keep) if keep else '(no table in the log)')
    step = next((s for s in steps if s['step'] == 'bench'), None)
    if step and step['exit'] != '0':
        tail = log.strip().splitlines()[-8:]
        w(f"\nbench.py did not finish ({verdict(step['exit'], step['cap_s'])}); the last lines of its log:\n```\n"
          + '\n'.join(tail) + '\n```')


def median(values):
    values = [v for v in values if isinstance(v, (int, float))]
    return statistics.median(values) if values else None


def fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else '-'


def training():
    by_step = {s['step']: s for s in steps}
    w('| run | result | iters done / max | last eval: iter, val loss | best val loss | tokens/s (median) | '
      'ms/iter (median) | MFU (median) | maxvio_batch (last eval) | wall s |')
    w('|---|---|---:|---:|---:|---:|---:|---:|---:|---:|')
    notes = []
    for name in ('dense', 'moe', 'deepseek_moe'):
        s = by_step.get(f'train {name}')
        rows = []
        for line in read(os.path.join(res, 'runs', name, 'metrics.jsonl')).splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass                                     # a line cut by the kill
        cfg = next((r for r in rows if r.get('type') == 'config'), {})
        max_iters = cfg.get('config', {}).get('max_iters', '?')
        trains = [r for r in rows if r.get('type') == 'train']
        evals = [r for r in rows if r.get('type') == 'eval']
        steady = trains[1:] or trains                  # the first logged window holds the compile
        done = trains[-1]['iter'] if trains else 0
        last = evals[-1] if evals else {}
        best = min((r['val_loss'] for r in evals), default=None)
        mv = last.get('maxvio_batch')
        result = verdict(s['exit'], s['cap_s']) if s else 'not run'
        if s and s['exit'] == '0' and done != max_iters:
            result += f' (but stopped at {done})'
        w(f"| {name} | {result} | {done} / {max_iters} | {last.get('iter', '-')}, {fmt(last.get('val_loss'), '.4f')} | "
          f"{fmt(best, '.4f')} | {fmt(median([r.get('tokens_per_s') for r in steady]), ',.0f')} | "
          f"{fmt(median([r.get('ms_per_iter') for r in steady]), '.1f')} | "
          f"{fmt(median([100 * r['mfu'] for r in steady if 'mfu' in r]), '.1f')}{'%' if any('mfu' in r for r in steady) else ''} | "
          f"{fmt(statistics.mean(mv), '.3f') if mv else '-'} | {s['wall_s'] if s else '-'} |")
        if not s or s['exit'] == '-':
            continue
        log = read(os.path.join(res, 'logs', f'train_{name}.log')).splitlines()
        first = log[0] if log else '(no output)'
        timing = next((l for l in log if l.startswith('timing:')), '')
        notes.append(f'- {name}: `{first}`' + (f'; `{timing}`' if timing else ''))
        if s and s['exit'] == '124' and done == max_iters:
            notes.append(f'  - cut by the {s["cap_s"]} s cap after its last iteration ({done}), while it evaluated, saved '
                         f'or measured the final expert selection: its last eval row may be missing')
        elif s and s['exit'] == '124':
            notes.append(f'  - cut by the {s["cap_s"]} s cap at iteration {done} of {max_iters}: its figures are those of a '
                         f'partial run, NOT of the {max_iters}-iteration result')
        if s and s['exit'] not in ('0', '124', '-'):
            notes.append('  - last lines:\n```\n' + '\n'.join(log[-8:]) + '\n```')
    w('\n' + '\n'.join(notes))
    loads = sorted(glob.glob(os.path.join(res, 'gpu_load_*.csv')))
    for p in loads:
        util, mem = [], []
        for row in csv.reader(read(p).splitlines()[1:]):
            try:
                util.append(float(row[1]))
                mem.append(float(row[2]))
            except (ValueError, IndexError):
                pass
        if util:
            w(f"\nGPU during {os.path.basename(p)[9:-4]}: utilisation mean {statistics.mean(util):.0f}% "
              f"(samples {len(util)}, 1 s apart), memory used max {max(mem) / 1024:.1f} GiB")


def compare():
    text = read(os.path.join(res, 'compare', 'summary.md'))
    w(text.strip() if text else '(no compare output)')
    log = read(os.path.join(res, 'logs', 'compare.log'))
    warn = [l for l in log.splitlines() if l.startswith(('warning', 'error'))]
    if warn:
        w('\n```\n' + '\n'.join(warn) + '\n```')


section('Steps', steps_table)
section('Environment', env_lines)
section('CUDA tests (tests/test_cuda.py)', tests)
section('bench.py', bench)
section('Training runs (train.py, metrics.jsonl)', training)
section('compare.py', compare)
w('\n## Files\n\nresults.tar.gz holds logs/ (every step\'s output), runs/<config>/metrics.jsonl, compare/ '
  '(figures, summary.md, summary.json), gpu_load_*.csv, env.txt and steps.tsv. No checkpoint comes back.')
with open(path + '.tmp', 'w') as f:
    f.write('\n'.join(out) + '\n')
os.replace(path + '.tmp', path)
PYEOF
  local rc=$?
  if [ "$rc" -ne 0 ]; then   # the Python summary failed: the step table alone, from bash
    {
      echo "# GPU check (the full summary failed with exit $rc; see results.tar.gz)"
      echo
      cat "$STEPS"
    } >"$OUT/summary.md"
  fi
}

refresh() {   # summary.md, env.txt and results.tar.gz in OUTDIR, from what has finished so far
  local name
  for name in $CONFIGS; do
    if [ -f "$RUNS/$name/metrics.jsonl" ]; then
      mkdir -p "$RES/runs/$name"
      cp "$RUNS/$name/metrics.jsonl" "$RES/runs/$name/"
    fi
  done
  write_summary
  [ -f "$RES/env.txt" ] && cp "$RES/env.txt" "$OUT/env.txt"
  tar -czf "$OUT/results.tar.gz.tmp" -C "$WORK" --exclude='*.pt' --exclude='*.tmp' results 2>/dev/null
  if [ "$(stat -c %s "$OUT/results.tar.gz.tmp" 2>/dev/null || echo 0)" -gt 15000000 ]; then   # the tool takes <= 16 MiB
    tar -czf "$OUT/results.tar.gz.tmp" -C "$WORK" --exclude='*.pt' --exclude='*.tmp' --exclude='*.png' results 2>/dev/null
  fi
  mv -f "$OUT/results.tar.gz.tmp" "$OUT/results.tar.gz" 2>/dev/null
}

# -----------------------------------------------------------------------------------------------------------
# the data: GPT-2 tokens of the TinyStories sample

check_data() {   # check_data DIR: 0 if DIR holds usable train.bin and val.bin (GPT-2 ids), with a message
  "$PY" - "$1" <<'PYEOF'
import os, sys
import numpy as np
d = sys.argv[1]
problems, sizes = [], []
for split in ('train', 'val'):
    p = os.path.join(d, f'{split}.bin')
    if not os.path.isfile(p) or os.path.getsize(p) < 2 * 1025:
        problems.append(f'{p} missing or too small')
        continue
    ids = np.memmap(p, dtype=np.uint16, mode='r')
    if ids.max() >= 50304:
        problems.append(f'{p} holds token id {ids.max()}, not GPT-2 tokens (vocab 50304)')
    sizes.append(f'{split}.bin {len(ids):,} tokens')
if problems:
    print('; '.join(problems) + '. Make them on the development machine with TIKTOKEN_CACHE_DIR=../shared/tiktoken_cache '
          'python data/tinystories/prepare.py --input ../shared/data/tinystories/train.txt --val-input '
          '../shared/data/tinystories/val.txt, and name data/tinystories/train.bin and data/tinystories/val.bin in '
          'the device call\'s carry list (they are git-ignored, so they travel only when carried)')
    sys.exit(1)
print(f'{d}: ' + ', '.join(sizes))
PYEOF
}

make_random_data() {   # make_random_data DIR: tiny uniformly random GPT-2 ids (for the dry run only)
  "$PY" - "$1" <<'PYEOF'
import os, sys
import numpy as np
d = sys.argv[1]
os.makedirs(d, exist_ok=True)
rng = np.random.default_rng(0)
for split in ('train', 'val'):
    rng.integers(0, 50257, 50_000).astype(np.uint16).tofile(os.path.join(d, f'{split}.bin'))
PYEOF
}

# -----------------------------------------------------------------------------------------------------------
# 1. the environment and the CUDA tests

say "repo $REPO, OUTDIR $OUT, scratch $WORK, python $PY, DRY_RUN=$DRY_RUN, training $TRAIN_MODE"
env_report() {
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(uname -srm)"
  echo "cpus: $(nproc)"
  echo "memory: $(free -g 2>/dev/null | awk '/^Mem:/ {print $2 " GiB total, " $7 " GiB available"}')"
  echo "scratch: $WORK ($(df -Ph "$WORK" | awk 'NR == 2 {print $4 " free"}'))"
  if git -C "$REPO" rev-parse HEAD >/dev/null 2>&1; then
    echo "git: $(git -C "$REPO" log -1 --format='%h %s' | cut -c1-100); $(git -C "$REPO" status --short | wc -l) paths changed or untracked"
  else
    echo "git: no repository here (a copy of the working tree)"
  fi
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "nvidia-smi: $(nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>&1 | head -4 | tr '\n' ';')"
  else
    echo "nvidia-smi: not found"
  fi
  "$PY" - <<'PYEOF'
import importlib, platform, sys
print(f'python: {sys.executable} {platform.python_version()}')
for name in ('torch', 'triton', 'numpy', 'tiktoken', 'matplotlib', 'pytest'):
    try:
        print(f'{name}: {importlib.import_module(name).__version__}')
    except Exception as e:
        print(f'{name}: not importable ({type(e).__name__})')
try:
    import torch
    print(f'torch.version.cuda: {torch.version.cuda}')
    print(f'torch.cuda.is_available: {torch.cuda.is_available()}')
    if torch.cuda.is_available():
        print(f'torch.cuda.get_device_name: {torch.cuda.get_device_name()}')
        print(f'torch.cuda.get_device_capability: {torch.cuda.get_device_capability()}')
        props = torch.cuda.get_device_properties(0)
        print(f'device memory: {props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs')
        print(f'bf16 supported: {torch.cuda.is_bf16_supported()}')
    print(f'F.grouped_mm: {hasattr(torch.nn.functional, "grouped_mm")}')
except Exception as e:
    print(f'torch probe failed: {type(e).__name__}: {e}')
try:                                   # what train.py will decide here, and the peak its MFU divides by
    import runtime
    print(f'runtime (deepseek_moe widths): {runtime.resolve_runtime(expert_widths=(384, 192)).summary()}')
    print(f'runtime.gpu_peak_flops: {runtime.gpu_peak_flops("cuda")}')
except Exception as e:
    print(f'runtime probe failed: {type(e).__name__}: {e}')
PYEOF
  echo
  echo "---- nvidia-smi"
  nvidia-smi 2>&1 | head -30 | sed 's/^/  /'
}
t0="$(now)"
timeout -k 5 "$CAP_ENV" bash -c "$(declare -f env_report); WORK='$WORK' PY='$PY' REPO='$REPO' env_report" \
  >"$RES/env.txt" 2>&1
record env $? "$(elapsed "$t0" "$(now)")" "$CAP_ENV"
refresh

run_step tests "$CAP_TESTS" "$LOGS/tests.log" \
  "$PY" -m pytest -v -rs --durations=10 -p no:cacheprovider tests/test_cuda.py

# -----------------------------------------------------------------------------------------------------------
# 2. bench.py

if [ "$DRY_RUN" = 1 ]; then
  bench_args=(--device cpu --sizes 1x64 --batch_size 2 --block_size 16 --vocab_size 256 --warmup 1 --rounds 2)
else
  bench_args=(--device cuda --sizes 6x384)
fi
start_monitor bench
run_step bench "$CAP_BENCH" "$LOGS/bench.log" "$PY" bench.py "${bench_args[@]}"
stop_monitor

# -----------------------------------------------------------------------------------------------------------
# 3. the three 5,000-iteration runs of the quickstart

t0="$(now)"
data_msg="$(check_data "$DATA_DIR" 2>&1)"
data_ok=$?
train_data="$DATA_DIR"
if [ "$data_ok" -ne 0 ] && [ "$DRY_RUN" = 1 ]; then   # the dry run may go on with random tokens; the real run may not
  train_data="$WORK/random_data"
  make_random_data "$train_data"
  data_msg="real data check FAILED: $data_msg -- the dry run goes on with random tokens in $train_data"
  data_ok=0
fi
echo "$data_msg" >"$LOGS/data.log"
record data "$([ "$data_ok" -eq 0 ] && echo 0 || echo 1)" "$(elapsed "$t0" "$(now)")" - "$data_msg"

if [ "$DRY_RUN" = 1 ]; then
  train_args=(--device=cpu --compile=False --n_layer=2 --n_embd=64 --n_head=2 --block_size=32 --batch_size=4
              --eval_iters=2 --log_interval=5 --warmup_iters=5 --max_iters=20 --lr_decay_iters=20 --eval_interval=10)
  export OMP_NUM_THREADS=1              # three runs on a 2-core machine
else
  train_args=(--device=cuda)            # fail at once rather than start a CPU run of a GPU-sized model
fi

train_one() {   # train_one CONFIG CAP: one run, its exit code and wall time in $WORK/train_CONFIG.{rc,s}
  local name="$1" cap="$2" t
  t="$(now)"
  timeout -k 5 "$cap" "$PY" train.py "config/$name.py" "${train_args[@]}" "--data_dir=$train_data" \
    "--out_dir=$RUNS/$name" >"$LOGS/train_$name.log" 2>&1
  echo $? >"$WORK/train_$name.rc"
  elapsed "$t" "$(now)" >"$WORK/train_$name.s"
}

if [ "$data_ok" -ne 0 ]; then
  for name in $CONFIGS; do
    record "train $name" - 0 "$CAP_TRAIN" "no data (see the data step)"
  done
  refresh
else
  start_monitor training
  if [ "$TRAIN_MODE" = parallel ]; then
    say "training $CONFIGS side by side, cap ${CAP_TRAIN}s each"
    pids=()
    for name in $CONFIGS; do
      train_one "$name" "$CAP_TRAIN" &
      pids+=($!)
    done
    waited=0
    while kill -0 "${pids[@]}" 2>/dev/null; do   # while any run is alive: what has finished so far to OUTDIR
      sleep 2
      waited=$((waited + 2))
      [ $((waited % 30)) -eq 0 ] && refresh
    done
    wait "${pids[@]}"
    run_cap="$CAP_TRAIN"
  else
    run_cap=$((CAP_TRAIN / 3))
    for name in $CONFIGS; do
      say "training $name, cap ${run_cap}s"
      train_one "$name" "$run_cap"
    done
  fi
  stop_monitor
  for name in $CONFIGS; do
    record "train $name" "$(cat "$WORK/train_$name.rc" 2>/dev/null || echo '?')" \
      "$(cat "$WORK/train_$name.s" 2>/dev/null || echo '?')" "$run_cap" "$train_data"
  done
  refresh
fi

# -----------------------------------------------------------------------------------------------------------
# 4. compare.py on the runs that logged anything

compare_dirs=()
for name in $CONFIGS; do
  [ -s "$RUNS/$name/metrics.jsonl" ] && compare_dirs+=("$RUNS/$name")
done
if [ "${#compare_dirs[@]}" -gt 0 ]; then
  run_step compare "$CAP_COMPARE" "$LOGS/compare.log" "$PY" compare.py "${compare_dirs[@]}" --out "$RES/compare"
else
  record compare - 0 "$CAP_COMPARE" "no run logged metrics"
fi

# -----------------------------------------------------------------------------------------------------------
# 5. the end: summary.md, env.txt, results.tar.gz and nothing else in OUTDIR

record total 0 "$(elapsed "$T_START" "$(now)")" - "the whole script"
refresh
echo
cat "$OUT/summary.md"
echo
say "OUTDIR $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
cut -f1-4 "$STEPS" | column -t -s "$(printf '\t')" 2>/dev/null || cut -f1-4 "$STEPS"
if [ "${KEEP_WORK:-0}" = 1 ]; then
  say "scratch kept: $WORK"
else
  rm -rf "$WORK"
fi
