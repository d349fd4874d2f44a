#!/usr/bin/env bash
# The balance study (results/balance/README.md): results/balance/runs.txt, one run per core, then compare.py. Resumable:
# finished runs are skipped, interrupted ones resume from their checkpoints.
#
#   bash results/balance/study.sh                 # from the repo root; cores 0 and 1
#   CPUS=1 bash results/balance/study.sh          # one core
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
# default-sN is results/cpu's deepseek_moe-sN (the same command, test_study.py checks it): a finished one is
# copied, not trained twice (an unfinished one is left to results/cpu's runner)
finished() { $PYTHON -c "import sys; sys.path.insert(0, 'results'); import study; sys.exit(not study.finished('$1'))"; }
for run in out-study/cpu/deepseek_moe-s*; do
  to=out-study/balance/default-s${run##*-s}
  if [ ! -e "$to" ] && grep -q "^default-s${run##*-s} " results/balance/runs.txt && finished "$run"; then
    mkdir -p out-study/balance && cp -r "$run" "$to"
  fi
done
$PYTHON results/study.py results/balance/runs.txt --cpus "${CPUS:-0,1}"
# groups in this order: config/deepseek_moe.py as it is, the old default, the loss-free settings, the
# auxiliary-loss ones, none
runs=""
for group in default both_1e-3 free_1e-3 free_3e-3 free_1e-2 free_3e-2 prop_ decay_ aux_1e-3 aux_1e-2 aux_1e-1 none; do
  runs="$runs $(ls -d results/balance/runs/$group*-s* 2>/dev/null || true)"
done
# shellcheck disable=SC2086
$PYTHON compare.py $runs --out results/balance --name-by-dir
