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
