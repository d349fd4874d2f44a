#!/usr/bin/env bash
# bench/gpu_check.sh OUTDIR: the whole GPU check in one command that fits the lease, each step under its own time
# cap and all of them under a total of 360 s (GPU_CHECK_TOTAL), going on past a failed step. In order:
#   env       nvidia-smi, python/torch/triton versions, the APIs the path needs, runtime.py's decisions
#   tests     pytest tests/test_cuda.py (bf16 into grouped_mm, no host sync, one inductor graph, train.py compiled)
#   bench     bench.py at the Quickstart size (6 x 384, 64 x 256 tokens, vocab 50,304): dense, moe, deepseek_moe,
#             step and FFN-layer cost against dense of the same active width, MFU, each model's compile time
#   train     train.py config/{dense,moe,deepseek_moe}.py at the Quickstart size, compiled, bf16, one after the
#             other, 200 iterations each: ms/iter, tokens/s, MFU, compile, peak memory, the projected time of the
#             5,000-iteration run. A SPEED check: 200 x 16,384 tokens is under one pass over the 3.3M-token sample,
#             and its losses compare nothing (the Quickstart's comparison needs the full TinyStories)
#   scaling   bench.py's expert-count slope (dense, E=8, E=64, E=256), only if the total budget has its cap left
# After every step OUTDIR/summary.md, env.txt and results.tar.gz are rewritten, so a run cut off at any point
# brings back what finished; summary.md says what each figure shows and does not show. Exit 0 only if every
# step passed and every check in summary.md's "Checks" did (bf16, compiled, grouped_mm, finite losses).
#
# The budget on one H100 or H200 (the machine's start, 1-2 minutes, is outside it):
#   step      cap s   expected s  why it fits
#   env         15        ~10     import torch, nvidia-smi
#   tests       75       40-60    7 eager tests (seconds); 3 tiny models and one tiny train.py compiled by inductor,
#                                 tens of seconds each cold, run 4 at a time with pytest-xdist (in the image);
#                                 without xdist they run one by one and the cap may cut the last (the summary says)
#   bench      110      50-90     3 models compiled cold (inductor on a GPU: tens of seconds each), 3 FFN layers and
#                                 2 expert-only functions (seconds each); the timing itself is ~5 s (10 warm-up
#                                 steps, 30 rounds at ~15-40 ms a step)
#   train    3 x 50   3 x 25-40   start-up and CUDA init ~8 s; the training graph from the inductor cache bench.py
#                                 filled (bench.py compiles the same graph: sizes, targets apart from the inputs, and
#                                 TF32 as train.py sets it, for the cache key holds it) ~5-10 s;
#                                 the eval graph cold ~10-20 s; 200 steps at ~15-40 ms; one checkpoint (~0.8 GB)
#                                 into RAM scratch
#   summaries  ~10                one per step (no torch import) and the tarball
#   total      360                the 350 s of caps above + summaries; the deadline stops any step at 350 s
#   scaling    100                only with 100 s of the 360 left (rarely): 3 more models to compile
# Compile times from the full dry run on the 2-core development machine, both cores busy with a training study
# (2 x 64, bf16; an upper guide for the GPU, where Triton compiles in parallel on 16 cores): bench.py's first step
# of a model, compiling cold, 23-35 s; train.py's training graph from bench.py's cache 0.6-6 s, its eval graph cold
# 13-41 s; a whole training run 22-61 s; tests/test_cuda.py 3m16s-3m29s (4 compiles in a row, no xdist there).
#
# The device tool call (15 minutes of device time in all, the machine's start included):
#   command:   bash bench/gpu_check.sh $OUT
#   carry:     ["data/tinystories/train.bin", "data/tinystories/val.bin", "data/tinystories/meta.json"]
#   timeout_s: 420
# 420 s is the 360 s budget and a minute of slack; a call is ~1.5 min of start + <= 6 min, so a second call
# fits in the 15 minutes when the first finished early or the machine is still warm (30 s), else rerun only what
# broke: GPU_CHECK_STEPS="bench train" GPU_CHECK_TOTAL=240 bash bench/gpu_check.sh $OUT (the device time left
# minus two minutes). The carried files are git-ignored (7.9 MB, far inside the 64 MiB that travel); make them here:
#   TIKTOKEN_CACHE_DIR=../shared/tiktoken_cache python data/tinystories/prepare.py \
#       --input ../shared/data/tinystories/train.txt --val-input ../shared/data/tinystories/val.txt
# What comes back: OUTDIR/summary.md, env.txt, results.tar.gz (logs, metrics.jsonl, nvidia-smi samples, steps;
# never a checkpoint), 3 of the 8 files the tool returns. Runs, checkpoints and inductor's cache live in a scratch
# folder in RAM, outside OUTDIR, and are deleted at the end.
#
# Dry runs on the CPU, before any GPU call. Both run the very same steps on the same code path, only smaller:
#   DRY_RUN=1 bash bench/gpu_check.sh /tmp/gpu_dry       # full: bf16 autocast AND torch.compile on (inductor on
#       the CPU, grouped_mm compiled in bf16), tests/test_cuda.py rehearsed on the CPU (TEST_CUDA_DEVICE=cpu),
#       bench and train at 2 x 64, 4 x 32 tokens, 20 iterations, the scaling step too. Measured on the 2-core
#       development machine while both cores ran a training study (2026-12-05): 9m34s and 12m05s, every step and
#       check passing (15m26s when more jobs shared the machine). Run it before a GPU call.
#   DRY_RUN=quick bash bench/gpu_check.sh /tmp/gpu_quick  # bf16, eager, tiny: the script's plumbing in CI
#       (tests/test_gpu_check.py): 48-71 s on the same busy machine, ~30 s of it CPU time.
# Settings (environment): DRY_RUN=0|1|quick; GPU_CHECK_STEPS (default "env tests bench train scaling");
# GPU_CHECK_TOTAL and CAP_ENV, CAP_TESTS, CAP_BENCH, CAP_TRAIN (each run), CAP_SCALING in seconds; PYTHON (default:
# the first of python3, python that imports torch); DATA_DIR (default data/tinystories); KEEP_WORK=1 keeps the
# scratch folder; TORCHINDUCTOR_CACHE_DIR (default: a fresh one in the scratch folder, so compile times are cold).

set -u
set -o pipefail

usage="usage: [DRY_RUN=1|quick] bash bench/gpu_check.sh OUTDIR"
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

case "${DRY_RUN:-0}" in
  0) MODE=gpu ;;
  1) MODE=full ;;
  quick) MODE=quick ;;
  *) echo "error: DRY_RUN must be 0, 1 or quick, got '${DRY_RUN}'" >&2; exit 2 ;;
esac
# caps in seconds, per mode: the GPU's are the budget in the header; the CPU's are what it needs, not a budget
GPU_CAPS="ENV=15 TESTS=75 BENCH=110 TRAIN=50 SCALING=100 TOTAL=360"
FULL_CAPS="ENV=60 TESTS=1200 BENCH=1200 TRAIN=400 SCALING=1500 TOTAL=7200"
QUICK_CAPS="ENV=60 TESTS=120 BENCH=120 TRAIN=120 SCALING=120 TOTAL=900"
caps="$GPU_CAPS"
[ "$MODE" = full ] && caps="$FULL_CAPS"
[ "$MODE" = quick ] && caps="$QUICK_CAPS"
for kv in $caps; do                 # CAP_ENV=... from the environment wins
  name="${kv%%=*}"
  var="CAP_$name"
  [ "$name" = TOTAL ] && var=GPU_CHECK_TOTAL
  [ -z "${!var:-}" ] && printf -v "$var" '%s' "${kv#*=}"
done
RESERVE=10                          # seconds of the total kept for the last summary
STEPS_WANTED=" ${GPU_CHECK_STEPS:-env tests bench train scaling} "
DATA_DIR="${DATA_DIR:-$REPO/data/tinystories}"
CONFIGS="dense moe deepseek_moe"
export PYTHONUNBUFFERED=1
if [ -z "${TIKTOKEN_CACHE_DIR:-}" ] && [ -d "$REPO/../shared/tiktoken_cache" ]; then
  export TIKTOKEN_CACHE_DIR="$REPO/../shared/tiktoken_cache"     # GPT-2 BPE files offline (not needed to train)
fi
[ "$MODE" != gpu ] && export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"   # the CPU rehearsal: one thread

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

# scratch folder: runs, checkpoints (~0.8 GB each), inductor's cache; RAM where there is room, never inside OUTDIR
if [ -n "${GPU_CHECK_WORK:-}" ]; then
  WORK="$GPU_CHECK_WORK"
  mkdir -p "$WORK"
elif [ -d /dev/shm ] && [ "$(df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 {print $4}')" -gt 8000000 ] 2>/dev/null; then
  WORK="$(mktemp -d /dev/shm/gpu_check.XXXXXX)"
else
  WORK="$(mktemp -d /tmp/gpu_check.XXXXXX)"
fi
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$WORK/inductor_cache}"
RES="$WORK/results"                      # what goes into results.tar.gz
LOGS="$RES/logs"
RUNS="$WORK/runs"                        # run dirs: metrics.jsonl is copied to $RES/runs, ckpt.pt is deleted
mkdir -p "$LOGS" "$RES/runs" "$RUNS" || exit 2
STEPS="$RES/steps.tsv"                   # one line per step: name, exit code, wall seconds, cap, note
printf 'step\texit\twall_s\tcap_s\tnote\n' >"$STEPS"
T_START="$(date +%s.%N)"
MONITOR_PID=""

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
left() { awk -v a="$T_START" -v b="$(now)" -v t="$GPU_CHECK_TOTAL" 'BEGIN { printf "%d", t - (b - a) }'; }
say() { echo "[gpu_check $(date +%H:%M:%S)] $*"; }
wanted() { [[ "$STEPS_WANTED" == *" $1 "* ]]; }

record() {   # record NAME EXIT WALL CAP NOTE
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5:-}" >>"$STEPS"
  local verdict="exit $2"
  [ "$2" = 0 ] && verdict=ok
  [ "$2" = 124 ] && verdict="CUT by its ${4}s cap"
  [ "$2" = 137 ] && verdict="KILLED at its ${4}s cap + 5 s"
  [ "$2" = - ] && verdict="not run"
  say "$1: $verdict (${3}s)${5:+; $5}"
}

cap_for() {   # cap_for CAP: CAP, or what the total budget has left (minus the reserve) if that is less
  local rest=$(( $(left) - RESERVE ))
  [ "$rest" -lt "$1" ] && echo "$rest" || echo "$1"
}

run_step() {   # run_step NAME CAP LOG COMMAND...: the command under timeout (capped by the total), output in LOG
  local name="$1" cap log="$3" note="" t0 rc
  cap="$(cap_for "$2")"
  shift 3
  if [ "$cap" -lt 2 ]; then
    record "$name" - 0 "$cap" "the total budget of ${GPU_CHECK_TOTAL}s is spent"
    refresh
    return 1
  fi
  [ "$cap" -lt "$2" ] 2>/dev/null && note="cap cut to what the ${GPU_CHECK_TOTAL}s total had left"
  t0="$(now)"
  say "$name: $* (cap ${cap}s)"
  timeout -k 5 "$cap" "$@" >"$log" 2>&1
  rc=$?
  record "$name" "$rc" "$(elapsed "$t0" "$(now)")" "$cap" "$note"
  refresh
  return "$rc"
}

start_monitor() {   # start_monitor NAME: GPU load and memory every second into gpu_NAME.csv, until stop_monitor
  if [ "$MODE" = gpu ] && command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,power.draw --format=csv,nounits -l 1 \
      >"$RES/gpu_$1.csv" 2>/dev/null &
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

refresh() {   # OUTDIR/summary.md, env.txt and results.tar.gz from what has finished so far; FINAL=1 at the end
  local name rc
  for name in $CONFIGS; do
    if [ -f "$RUNS/$name/metrics.jsonl" ]; then
      mkdir -p "$RES/runs/$name"
      cp "$RUNS/$name/metrics.jsonl" "$RES/runs/$name/"
    fi
  done
  timeout 60 "$PY" "$REPO/bench/gpu_summary.py" "$RES" "$OUT/summary.md" --mode "$MODE" \
    --elapsed_s "$(elapsed "$T_START" "$(now)")" --budget_s "$GPU_CHECK_TOTAL" ${FINAL:+--final} 2>>"$LOGS/summary.log"
  rc=$?
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 1 ]; then   # the summary itself broke: the step table alone, from bash
    { echo "# GPU check (bench/gpu_summary.py failed with exit $rc; see results.tar.gz, logs/summary.log)"; echo
      cat "$STEPS"; } >"$OUT/summary.md"
  fi
  [ -f "$RES/env.txt" ] && cp "$RES/env.txt" "$OUT/env.txt"
  tar -czf "$OUT/results.tar.gz.tmp" -C "$WORK" --exclude='*.pt' --exclude='*.tmp' results 2>/dev/null
  if [ "$(stat -c %s "$OUT/results.tar.gz.tmp" 2>/dev/null || echo 0)" -gt 15000000 ]; then
    # the tool returns files of at most 16 MiB: keep the last MB of every file instead (a log that ran away)
    rm -rf "$WORK/results_tail" && mkdir -p "$WORK/results_tail"
    (cd "$WORK" && find results -type f ! -name '*.pt' | while read -r f; do
       mkdir -p "results_tail/$(dirname "$f")" && tail -c 1000000 "$f" >"results_tail/$f"; done)
    tar -czf "$OUT/results.tar.gz.tmp" -C "$WORK/results_tail" results 2>/dev/null
  fi
  mv -f "$OUT/results.tar.gz.tmp" "$OUT/results.tar.gz" 2>/dev/null
  return "$rc"
}

on_signal() {   # killed from outside (the device tool's limit): say so in what is already there
  stop_monitor
  record interrupted 143 "$(elapsed "$T_START" "$(now)")" - "the script was stopped from outside"
  FINAL=1 refresh
  exit 143
}
trap on_signal TERM INT

# -----------------------------------------------------------------------------------------------------------
# the sizes of each mode: the GPU's is the Quickstart's; the dry runs shrink it and keep everything else

BENCH_ARGS=(--device cuda --dtype bfloat16 --compile true --sizes 6x384 --batch_size 64 --block_size 256
            --vocab_size 50304 --warmup 10 --rounds 30)
TRAIN_ARGS=(--device=cuda --dtype=bfloat16 --compile=True --max_iters=200 --eval_interval=200 --eval_iters=20
            --log_interval=20)
PYTEST_ARGS=(-v -rs --durations=10 -p no:cacheprovider)
TEST_ENV=()
if [ "$MODE" = gpu ] \
    && "$PY" -c 'import sys, xdist; sys.exit(tuple(map(int, xdist.__version__.split(".")[:2])) < (3, 2))' 2>/dev/null
then
  # the compiles of 4 tests at a time, 4 inductor workers each (16 cores); an idle worker takes queued tests
  # from a busy one (--dist worksteal, xdist 3.2+)
  PYTEST_ARGS+=(-n 4 --dist worksteal)
  TEST_ENV=(TORCHINDUCTOR_COMPILE_THREADS=4)
fi
if [ "$MODE" = full ]; then             # bench and train at the same sizes, so bench's cache serves train as on the GPU
  BENCH_ARGS=(--device cpu --dtype bfloat16 --compile true --sizes 2x64 --batch_size 4 --block_size 32
              --vocab_size 50304 --warmup 2 --rounds 3)
  TRAIN_ARGS=(--device=cpu --dtype=bfloat16 --compile=True --n_layer=2 --n_embd=64 --n_head=1 --batch_size=4
              --block_size=32 --max_iters=20 --eval_interval=20 --eval_iters=2 --log_interval=5)
  TEST_ENV=(TEST_CUDA_DEVICE=cpu)
elif [ "$MODE" = quick ]; then          # eager: compiling costs minutes on a CPU
  BENCH_ARGS=(--device cpu --dtype bfloat16 --compile false --sizes 1x64 --batch_size 2 --block_size 16
              --vocab_size 256 --warmup 1 --rounds 2)
  TRAIN_ARGS=(--device=cpu --dtype=bfloat16 --compile=False --n_layer=1 --n_embd=64 --n_head=1 --batch_size=2
              --block_size=16 --max_iters=10 --eval_interval=10 --eval_iters=1 --log_interval=5)
  TEST_ENV=(TEST_CUDA_DEVICE=cpu)
  PYTEST_ARGS+=(-k 'not compiled')
fi

# -----------------------------------------------------------------------------------------------------------
# env

env_report() {
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "mode: $MODE"
  echo "host: $(uname -srm)"
  echo "cpus: $(nproc --all)"
  echo "memory: $(free -g 2>/dev/null | awk '/^Mem:/ {print $2 " GiB total, " $7 " GiB available"}')"
  echo "scratch: $WORK ($(df -Ph "$WORK" | awk 'NR == 2 {print $4 " free"}'))"
  if git -C "$REPO" rev-parse HEAD >/dev/null 2>&1; then
    echo "git: $(git -C "$REPO" log -1 --format='%h %s' | cut -c1-100); $(git -C "$REPO" status --short | wc -l) paths changed or untracked"
  else
    echo "git: no repository here (a copy of the working tree)"
  fi
  echo "gcc: $(gcc --version 2>/dev/null | head -1 || echo 'not found (inductor on the CPU needs it)')"
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "nvidia-smi: $(nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>&1 | head -4 | tr '\n' ';')"
  else
    echo "nvidia-smi: not found"
  fi
  "$PY" - <<'PYEOF'
import importlib, platform, sys
print(f'python: {sys.executable} {platform.python_version()}')
for name in ('torch', 'triton', 'numpy', 'pytest', 'xdist', 'tiktoken', 'wandb', 'datasets'):
    try:
        print(f'{name}: {importlib.import_module(name).__version__}')
    except Exception as e:
        unneeded = name in ('wandb', 'datasets', 'tiktoken')
        print(f'{name}: not importable ({type(e).__name__})' + (' - not needed here' if unneeded else ''))
try:
    import torch
    import torch._dynamo.config as dynamo_config
    import torch.nn.functional as F
    print(f'torch.version.cuda: {torch.version.cuda}')
    print(f'torch.cuda.is_available: {torch.cuda.is_available()}')
    if torch.cuda.is_available():
        print(f'torch.cuda.get_device_name: {torch.cuda.get_device_name()}')
        print(f'torch.cuda.get_device_capability: {torch.cuda.get_device_capability()}')
        props = torch.cuda.get_device_properties(0)
        print(f'device memory: {props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs')
        print(f'bf16 supported: {torch.cuda.is_bf16_supported()}')
    # what the path calls beyond torch's old API: a torch older than the repo's minimum (2.10) fails here first
    needs = {'F.grouped_mm': hasattr(F, 'grouped_mm'),
             'dynamo recompile_limit': hasattr(dynamo_config, 'recompile_limit'),
             'dynamo fail_on_recompile_limit_hit': hasattr(dynamo_config, 'fail_on_recompile_limit_hit'),
             'torch.get_autocast_dtype': hasattr(torch, 'get_autocast_dtype'),
             'torch.compiler.is_compiling': hasattr(torch.compiler, 'is_compiling')}
    print('APIs the path needs: ' + ', '.join(f"{k} {'yes' if v else 'MISSING'}" for k, v in needs.items()))
except Exception as e:
    print(f'torch probe failed: {type(e).__name__}: {e}')
try:                                   # what train.py will decide here, and the peak its MFU divides by
    import runtime
    for compile in (True, False):
        rt = runtime.resolve_runtime(dtype='bfloat16', compile=compile, expert_widths=(384, 192))
        print(f'runtime (deepseek_moe widths, bf16, compile {compile}): {rt.summary()}')
    print(f'runtime.gpu_peak_flops: {runtime.gpu_peak_flops("cuda")}')
except Exception as e:
    print(f'runtime probe failed: {type(e).__name__}: {e}')
PYEOF
  echo
  echo "---- nvidia-smi"
  nvidia-smi 2>&1 | head -30 | sed 's/^/  /'
}

say "repo $REPO, OUTDIR $OUT, scratch $WORK, python $PY, mode $MODE, steps${STEPS_WANTED% }, total ${GPU_CHECK_TOTAL}s"
if wanted env; then
  t0="$(now)"
  cap="$(cap_for "$CAP_ENV")"
  timeout -k 5 "$cap" bash -c "$(declare -f env_report); MODE='$MODE' WORK='$WORK' PY='$PY' REPO='$REPO' env_report" \
    >"$RES/env.txt" 2>&1
  record env $? "$(elapsed "$t0" "$(now)")" "$cap"
  refresh
fi

# -----------------------------------------------------------------------------------------------------------
# tests: tests/test_cuda.py (on the CPU, its rehearsal)

if wanted tests; then
  run_step tests "$CAP_TESTS" "$LOGS/tests.log" \
    env "${TEST_ENV[@]}" "$PY" -m pytest "${PYTEST_ARGS[@]}" tests/test_cuda.py
fi

# -----------------------------------------------------------------------------------------------------------
# bench: the Quickstart size, without the scaling family (it comes last, if time is left)

if wanted bench; then
  start_monitor bench
  run_step bench "$CAP_BENCH" "$LOGS/bench.log" "$PY" bench.py "${BENCH_ARGS[@]}" --no_scaling
  stop_monitor
fi

# -----------------------------------------------------------------------------------------------------------
# train: the data, then the three configs one after the other

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
          '../shared/data/tinystories/val.txt, and name data/tinystories/{train.bin,val.bin,meta.json} in '
          'the device call\'s carry list (they are git-ignored, so they travel only when carried)')
    sys.exit(1)
print(f'{d}: ' + ', '.join(sizes))
PYEOF
}

make_random_data() {   # make_random_data DIR: uniformly random GPT-2 ids (the dry runs only, without the sample)
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

if wanted train; then
  t0="$(now)"
  data_msg="$(check_data "$DATA_DIR" 2>&1)"
  data_ok=$?
  train_data="$DATA_DIR"
  if [ "$data_ok" -ne 0 ] && [ "$MODE" != gpu ]; then   # a dry run may go on with random tokens; the GPU run may not
    train_data="$WORK/random_data"
    make_random_data "$train_data"
    data_msg="no sample data ($data_msg) -- the dry run goes on with random tokens"
    data_ok=0
  fi
  echo "$data_msg" >"$LOGS/data.log"
  record data "$([ "$data_ok" -eq 0 ] && echo 0 || echo 1)" "$(elapsed "$t0" "$(now)")" - "$data_msg"
  for name in $CONFIGS; do
    if [ "$data_ok" -ne 0 ]; then
      record "train $name" - 0 "$CAP_TRAIN" "no data (see the data step)"
      continue
    fi
    start_monitor "train_$name"
    # dynamo says in the log when it recompiles or breaks the graph: the summary's checks count both
    run_step "train $name" "$CAP_TRAIN" "$LOGS/train_$name.log" env TORCH_LOGS=recompiles,graph_breaks \
      "$PY" train.py "config/$name.py" "${TRAIN_ARGS[@]}" "--data_dir=$train_data" "--out_dir=$RUNS/$name"
    stop_monitor
    rm -f "$RUNS/$name/ckpt.pt" "$RUNS/$name/ckpt.pt.tmp"     # ~0.8 GB of RAM each; never comes back
  done
  refresh
fi

# -----------------------------------------------------------------------------------------------------------
# scaling: bench.py's expert-count slope, only if the total budget still holds its whole cap

if wanted scaling; then
  if [ $(( $(left) - RESERVE )) -ge "$CAP_SCALING" ]; then
    start_monitor scaling
    run_step scaling "$CAP_SCALING" "$LOGS/scaling.log" "$PY" bench.py "${BENCH_ARGS[@]}" --models dense E=8 E=64 E=256
    stop_monitor
  else
    record scaling - 0 "$CAP_SCALING" \
      "$(( $(left) - RESERVE ))s of the ${GPU_CHECK_TOTAL}s total left, it needs ${CAP_SCALING}s"
  fi
fi

# -----------------------------------------------------------------------------------------------------------
# the end: summary.md, env.txt, results.tar.gz and nothing else in OUTDIR

record total 0 "$(elapsed "$T_START" "$(now)")" - "the whole script"
FINAL=1 refresh
status=$?
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
exit "$status"
