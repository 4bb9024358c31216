#!/usr/bin/env bash
# The test command of the README: set up (scripts/setup_env.sh), then run the
# pytest suite. CUDA cases run when a GPU is visible and skip otherwise.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
"${PYTHON:-python3}" -m pytest python_tests -q "$@"
