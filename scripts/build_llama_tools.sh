#!/usr/bin/env bash
# Build llama.cpp's own command-line tools from the llama.cpp that the pinned llama-cpp-python vendors,
# with exactly the CMake flags llama-cpp-python was built with (read from .venv/llamalens-cmake-args,
# which scripts/install.sh writes after its smoke test; scripts/build_flags.sh's choice where there is
# none), so comparisons with them are like for like. One CMake tree, four targets, into .tools/bin:
#   llama-perplexity      the tests that compare llamalens score/compare with it, and scripts/bench.py
#   llama-bench           scripts/bench.py (pp512 / tg64)
#   llama-batched-bench   scripts/bench.py (32 and 64 sequences sharing a prompt)
#   llama-server          (LLAMA_BUILD_SERVER=ON; no curl, no OpenSSL, no web UI download)
# Optional: the tests that use llama-perplexity run when .tools/bin/llama-perplexity exists (or
# LLAMA_PERPLEXITY points at one) and are skipped otherwise. About 12 minutes on 2 cores;
# `scripts/install.sh --test` runs it (a failure there only skips those tests).
#   scripts/build_llama_tools.sh [--build-dir DIR] [--bin-dir DIR] [--targets "T1 T2"]
#       a second set elsewhere (e.g. CMAKE_ARGS="$(python3 scripts/cpu_flags.py --safe)" for an AVX2 one
#       to compare builds with scripts/bench.py --build), or only some of the targets
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=build_flags.sh
. scripts/build_flags.sh
build=.tools/build
bin=.tools/bin
targets=(llama-perplexity llama-bench llama-batched-bench llama-server)
while [ $# -gt 0 ]; do
  case "$1" in
    --build-dir) build="$2"; shift 2 ;;
    --bin-dir) bin="$2"; shift 2 ;;
    --targets) read -r -a targets <<< "$2"; shift 2 ;;
    *) echo "usage: scripts/build_llama_tools.sh [--build-dir DIR] [--bin-dir DIR] [--targets \"T1 T2\"]" >&2; exit 2 ;;
  esac
done
if [ -z "${CMAKE_ARGS:-}" ] && [ -f .venv/llamalens-cmake-args ]; then
  cmake_args=$(cat .venv/llamalens-cmake-args)  # what llama-cpp-python was really built with
fi

stamp="$bin/stamp"
want="$llama_version ${targets[*]} $cmake_args"
all_built() { local t; for t in "${targets[@]}"; do [ -x "$bin/$t" ] || return 1; done; }
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && all_built; then
  echo "llama.cpp tools ($llama_version) already built in $bin for: $(describe_flags "$cmake_args")"
  exit 0
fi
echo "building llama.cpp's ${targets[*]} ($llama_version) into $bin"
echo "  for: $(describe_flags "$cmake_args") (about 12 minutes on 2 cores) ..."
mkdir -p .tools/src
if [ ! -d ".tools/src/llama_cpp_python-$llama_version" ]; then
  "${PYTHON:-python3}" -m pip download -q --no-deps --no-binary :all: -d .tools/src "llama-cpp-python==$llama_version" \
    || .venv/bin/python -m pip download -q --no-deps --no-binary :all: -d .tools/src "llama-cpp-python==$llama_version"
  tar -xzf ".tools/src/llama_cpp_python-$llama_version.tar.gz" -C .tools/src
fi
src=".tools/src/llama_cpp_python-$llama_version/vendor/llama.cpp"
mkdir -p "$(dirname "$build")"
rm -f "$build/CMakeCache.txt"  # options left in the cache by other flags must not leak into this build
start=$(date +%s)
# shellcheck disable=SC2086
cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
  -DLLAMA_BUILD_APP=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF $cmake_args >"$build.cmake.log" 2>&1 \
  || { tail -20 "$build.cmake.log" >&2; exit 1; }
cmake --build "$build" --target "${targets[@]}" -j "${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}" \
  >"$build.log" 2>&1 || { tail -30 "$build.log" >&2; exit 1; }
mkdir -p "$bin"
for t in "${targets[@]}"; do cp "$build/bin/$t" "$bin/"; done
echo "$want" > "$stamp"
echo "built ${targets[*]} in $bin in $(( $(date +%s) - start )) s (llama.cpp from llama-cpp-python $llama_version)"
