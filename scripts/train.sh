#!/usr/bin/env bash
# The main job of the README: set up (scripts/setup_env.sh), then train the default
# CRAM model on SRCD (python -m cram_ext.train; on the GPU when one is visible) and
# print the utilization reduction and the retrieval accuracy. Arguments go to the
# trainer, e.g. `bash scripts/train.sh --task mqar --out runs/mqar`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
exec "${PYTHON:-python3}" -m cram_ext.train "$@"
