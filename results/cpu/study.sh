#!/usr/bin/env bash
# The CPU study of README "Results": every config at the CPU size (config/tinystories_cpu.py), several
# seeds each, on the TinyStories sample in ../shared/data, then compare.py over all runs.
#
#   bash results/cpu/study.sh                 # from the repo root; resumable: finished runs are skipped
#   THREADS=2 CPUS=0,1 bash results/cpu/study.sh
#
# Runs go to out-study/<config>-s<seed>/ (checkpoints stay there); their metrics.jsonl are copied to
# results/cpu/runs/, and compare.py writes the figures, summary.md and summary.json to results/cpu/.
# One run at a time: two at once would make every tokens/s figure wrong.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
THREADS=${THREADS:-1}          # the recorded study: 1 thread, pinned to core 1 (CPUS=1)
CPUS=${CPUS:-1}
SHARED=${SHARED:-../shared/data/tinystories}

# the order: the main comparison first (seeds 1-3), then the ladder and the upper bound (seed 1), then
# seeds 4-5 of the two MoEs (the minimum the study needs), then seeds 2-3 of the ladder and dense_total
RUNS="moe:1 deepseek_moe:1 dense:1 moe:2 deepseek_moe:2 dense:2 moe:3 deepseek_moe:3 dense:3
      moe_finegrained:1 moe_shared:1 dense_total:1 moe:4 deepseek_moe:4 moe:5 deepseek_moe:5
      moe_finegrained:2 moe_shared:2 dense_total:2 moe_finegrained:3 moe_shared:3 dense_total:3"

# glibc: keep the ~400 MB of logits and gradients between steps instead of faulting them in every step
export MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 OMP_NUM_THREADS=$THREADS
if [ -d ../shared/tiktoken_cache ]; then export TIKTOKEN_CACHE_DIR="$(cd ../shared/tiktoken_cache && pwd)"; fi

if [ ! -f data/tinystories/train.bin ]; then
  $PYTHON data/tinystories/prepare.py --input "$SHARED/train.txt" --val-input "$SHARED/val.txt"
fi

finished() {   # a run is finished when its metrics hold the end-of-run expert selection or the eval at max_iters
  [ -f "$1/metrics.jsonl" ] && $PYTHON - "$1/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
max_iters = [r for r in rows if r['type'] == 'config'][-1]['config']['max_iters']
sys.exit(0 if any(r['type'] == 'eval' and r['iter'] == max_iters for r in rows) else 1)
PY
}

for run in $RUNS; do
  config=${run%%:*}
  seed=${run##*:}
  out=out-study/$config-s$seed
  if finished "$out"; then
    echo "== $out: finished, skipped"
  else
    init=scratch
    if [ -f "$out/ckpt.pt" ]; then init=resume; fi
    echo "== $out ($init), $(date -u +%FT%TZ)"
    mkdir -p out-study
    start=$(date +%s)
    taskset -c "$CPUS" $PYTHON train.py config/tinystories_cpu.py "config/$config.py" --seed="$seed" \
      --out_dir="$out" --init_from=$init >> "$out.log" 2>&1 || { tail -5 "$out.log"; exit 1; }
    echo "   $(( $(date +%s) - start )) s"
  fi
  mkdir -p "results/cpu/runs/$config-s$seed"
  cp "$out/metrics.jsonl" "results/cpu/runs/$config-s$seed/metrics.jsonl"
done

# groups in this order, so that every difference a - b reads "the richer model minus the simpler one":
# deepseek_moe - moe_shared is rung 3, moe_shared - moe_finegrained rung 2, moe_finegrained - moe rung 1
runs=""
for config in dense_total deepseek_moe moe_shared moe_finegrained moe dense; do
  runs="$runs $(ls -d results/cpu/runs/$config-s* 2>/dev/null || true)"
done
# shellcheck disable=SC2086
$PYTHON compare.py $runs --out results/cpu

# where the tokens go: the last MoE layer of DeepSeekMoE's first seed (routing.png, top_tokens.md)
if [ -f out-study/deepseek_moe-s1/ckpt.pt ]; then
  $PYTHON compare.py --routing out-study/deepseek_moe-s1 --out results/cpu \
    --text "Once upon a time, Lily found a red ball in the park. She was very happy."
fi
