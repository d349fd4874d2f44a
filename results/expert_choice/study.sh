#!/usr/bin/env bash
# The expert-choice study (results/expert_choice/README.md): results/expert_choice/runs.txt, one run per core, then
# compare.py over them beside the main study's token-choice moe and deepseek_moe (results/cpu/runs/). Resumable.
#
#   bash results/expert_choice/study.sh        # from the repo root; cores 0 and 1
#   CPUS=1 bash results/expert_choice/study.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
$PYTHON results/study.py results/expert_choice/runs.txt --cpus "${CPUS:-0,1}"
runs=""
for group in batch sequence chunk32; do
  runs="$runs $(ls -d results/expert_choice/runs/$group-s* 2>/dev/null || true)"
done
runs="$runs $(ls -d results/cpu/runs/moe-s* results/cpu/runs/deepseek_moe-s* 2>/dev/null || true)"
# shellcheck disable=SC2086
$PYTHON compare.py $runs --out results/expert_choice --name-by-dir
