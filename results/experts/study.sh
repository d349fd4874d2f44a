#!/usr/bin/env bash
# The experts study (results/experts/README.md): what the experts of deepseek_moe, moe, moe_finegrained and moe_shared
# learned, measured on their checkpoints by analyze_experts.py. The runs are results/cpu's (the same commands, so the
# losses are that study's): the ones whose checkpoints are missing are trained first (resumably, one per core),
# then all of them are analysed into results/experts/. Checkpoints stay in out-study/cpu/, out of git.
#
#   bash results/experts/study.sh                 # from the repo root; cores 0 and 1
#   CPUS=1 bash results/experts/study.sh          # one core
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
GROUPS_="deepseek_moe moe_shared moe_finegrained moe"   # the ladder top down: a difference a - b reads "richer minus simpler"
$PYTHON results/study.py results/cpu/runs.txt --cpus "${CPUS:-0,1}" --only "$(echo $GROUPS_ | tr ' ' ',')"
runs=""
for group in $GROUPS_; do
  runs="$runs $(ls -d out-study/cpu/$group-s* 2>/dev/null | grep -E -- '-s[0-9]+$' | sort -V || true)"
done
# shellcheck disable=SC2086
$PYTHON analyze_experts.py $runs --out results/experts
