#!/usr/bin/env bash
# The first CPU study (the GPT-2-vocabulary study, results/cpu_gpt2/README.md): every config
# at config/tinystories_cpu_gpt2.py's size, on the GPT-2 tokens of the TinyStories sample in ../shared/data,
# several seeds each, then compare.py. Resumable: finished runs are skipped, interrupted ones resume.
#
#   bash results/cpu_gpt2/study.sh            # from the repo root; one run at a time on core 1, as recorded
#   CPUS=0,1 bash results/cpu_gpt2/study.sh   # two at a time
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
SHARED=${SHARED:-../shared}
if [ -d "$SHARED/tiktoken_cache" ]; then export TIKTOKEN_CACHE_DIR="$(cd "$SHARED/tiktoken_cache" && pwd)"; fi
if [ ! -f data/tinystories/train.bin ]; then
  $PYTHON data/tinystories/prepare.py --input "$SHARED/data/tinystories/train.txt" --val-input "$SHARED/data/tinystories/val.txt"
fi
$PYTHON results/study.py results/cpu_gpt2/runs.txt --cpus "${CPUS:-1}"
# groups in this order, so that every difference a - b reads "the richer model minus the simpler one"
runs=""
for config in dense_total deepseek_moe moe_shared moe_finegrained moe dense; do
  runs="$runs $(ls -d results/cpu_gpt2/runs/$config-s* 2>/dev/null || true)"
done
# shellcheck disable=SC2086
$PYTHON compare.py $runs --out results/cpu_gpt2
if [ -f out-study/cpu_gpt2/deepseek_moe-s1/ckpt.pt ]; then
  $PYTHON compare.py --routing out-study/cpu_gpt2/deepseek_moe-s1 --out results/cpu_gpt2 \
    --text "Once upon a time, Lily found a red ball in the park. She was very happy."
fi
