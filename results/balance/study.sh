#!/usr/bin/env bash
# The balance study (results/balance/README.md): results/balance/runs.txt, one run per core, then compare.py. Resumable:
# finished runs are skipped, interrupted ones resume from their checkpoints.
#
#   bash results/balance/study.sh                 # from the repo root; cores 0 and 1
#   CPUS=1 bash results/balance/study.sh          # one core
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
$PYTHON results/study.py results/balance/runs.txt --cpus "${CPUS:-0,1}"
