#!/usr/bin/env bash
# Installs what cram_ext needs and builds it in place (editable). Sourced by the
# README's commands, so a fresh machine needs nothing else. Idempotent: a second
# run only rebuilds what changed.
#   TORCH_SPEC   the torch to install when none is importable (default torch==2.13.0)
#   TRANSFORMERS_SPEC  the Hugging Face transformers to install when none is importable, for
#                the adapter cram_ext.hf and its tests (default transformers==5.17.0)
#   MAX_JOBS     parallel compile jobs (default: the number of cores)
set -euo pipefail
PYTHON=${PYTHON:-python3}
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  "$PYTHON" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
"$PYTHON" -m pip install -q numpy ninja pytest expecttest hypothesis tqdm matplotlib scipy
if ! "$PYTHON" -c "import transformers" 2>/dev/null; then
  "$PYTHON" -m pip install -q "${TRANSFORMERS_SPEC:-transformers==5.17.0}"
fi
# CUTLASS/CuTe headers for the CUDA kernels (header-only; its Python deps are not needed).
"$PYTHON" -m pip install -q --no-deps nvidia-cutlass
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
"$PYTHON" -m pip install -q --no-build-isolation -e .
