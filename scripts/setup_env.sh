#!/usr/bin/env bash
# Installs what cram_ext needs and builds it in place (editable). Sourced by the
# README's commands, so a fresh machine needs nothing else. Idempotent: a second
# run skips the build when the extension loads and nothing it is built from changed
# (csrc/, setup.py, pyproject.toml, CMakeLists.txt, the torch version, CRAM_FORCE_CPU and
# TORCH_CUDA_ARCH_LIST; the stamp is build/setup_env.stamp).
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
# setuptools >= 70.1 builds wheels itself (older ones need `wheel`, which --no-build-isolation
# does not install from pyproject.toml).
"$PYTHON" -m pip install -q "setuptools>=70.1" numpy ninja pytest expecttest hypothesis tqdm matplotlib scipy
if ! "$PYTHON" -c "import transformers" 2>/dev/null; then
  "$PYTHON" -m pip install -q "${TRANSFORMERS_SPEC:-transformers==5.17.0}"
fi
# CUTLASS/CuTe headers for the CUDA kernels (header-only; its Python deps are not needed).
"$PYTHON" -m pip install -q --no-deps nvidia-cutlass
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
stamp=build/setup_env.stamp
sources=$( { find csrc -type f -print0 | sort -z | xargs -0 sha256sum; sha256sum setup.py pyproject.toml CMakeLists.txt;
             "$PYTHON" -c "import torch; print(torch.__version__)"; echo "${CRAM_FORCE_CPU:-}/${TORCH_CUDA_ARCH_LIST:-}"; } \
           | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$sources" ] && "$PYTHON" -c "import cram_ext; cram_ext.build_info()" 2>/dev/null; then
  echo "cram_ext: built from these sources already (delete $stamp to rebuild)"
else
  "$PYTHON" -m pip install -q --no-build-isolation -e .
  mkdir -p build && echo "$sources" > "$stamp"
fi
