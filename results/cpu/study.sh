#!/usr/bin/env bash
# The cpu study (results/cpu/README.md): results/cpu/runs.txt, one run per core, then compare.py. Resumable:
# finished runs are skipped, interrupted ones resume from their checkpoints.
#
#   bash results/cpu/study.sh                 # from the repo root; cores 0 and 1
#   CPUS=1 bash results/cpu/study.sh          # one core
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
$PYTHON results/study.py results/cpu/runs.txt --cpus "${CPUS:-0,1}"
# groups in this order, so that every difference a - b reads "the richer model minus the simpler one":
# deepseek_moe - moe_shared is rung 3, moe_shared - moe_finegrained rung 2, moe_finegrained - moe rung 1
runs=""
for config in dense_total deepseek_moe moe_shared moe_finegrained moe dense; do
  runs="$runs $(ls -d results/cpu/runs/$config-s* 2>/dev/null || true)"
done
# shellcheck disable=SC2086
$PYTHON compare.py $runs --out results/cpu
# compare.py --routing decodes with GPT-2's BPE files: without internet, ../shared's copy (as results/study.py uses)
SHARED=${SHARED:-../shared}
if [ -z "${TIKTOKEN_CACHE_DIR:-}" ] && [ -d "$SHARED/tiktoken_cache" ]; then
  export TIKTOKEN_CACHE_DIR="$(cd "$SHARED/tiktoken_cache" && pwd)"
fi
# where the tokens go: the last MoE layer of DeepSeekMoE's first seed (routing.png, top_tokens.md)
if [ -f out-study/cpu/deepseek_moe-s1/ckpt.pt ]; then
  $PYTHON compare.py --routing out-study/cpu/deepseek_moe-s1 --out results/cpu \
    --text "Once upon a time, Lily found a red ball in the park. She was very happy."
fi
