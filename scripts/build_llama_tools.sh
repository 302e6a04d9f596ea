#!/usr/bin/env bash
# Build llama.cpp's own command-line tools (llama-perplexity) from the llama.cpp that the pinned
# llama-cpp-python vendors, with the same CMake flags as scripts/install.sh, into .tools/bin.
# Optional: the tests that compare llamalens with llama-perplexity run when .tools/bin/llama-perplexity
# exists (or LLAMA_PERPLEXITY points at one) and are skipped otherwise. About 5 minutes on 2 cores;
# `scripts/install.sh --test` runs it (a failure there only skips those tests).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=build_flags.sh
. scripts/build_flags.sh

stamp=".tools/stamp"
if [ -x .tools/bin/llama-perplexity ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$llama_version $cmake_args" ]; then
  echo "llama-perplexity ($llama_version) already built in .tools/bin"
  exit 0
fi
echo "building llama.cpp's llama-perplexity ($llama_version) into .tools/bin (about 5 minutes) ..."
mkdir -p .tools/src
if [ ! -d ".tools/src/llama_cpp_python-$llama_version" ]; then
  .venv/bin/python -m pip download -q --no-deps --no-binary :all: -d .tools/src "llama-cpp-python==$llama_version"
  tar -xzf ".tools/src/llama_cpp_python-$llama_version.tar.gz" -C .tools/src
fi
src=".tools/src/llama_cpp_python-$llama_version/vendor/llama.cpp"
# shellcheck disable=SC2086
cmake -S "$src" -B .tools/build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF $cmake_args >/dev/null
cmake --build .tools/build --target llama-perplexity -j "$(nproc 2>/dev/null || echo 2)" >/dev/null
mkdir -p .tools/bin
cp .tools/build/bin/llama-perplexity .tools/bin/
echo "$llama_version $cmake_args" > "$stamp"
echo "built .tools/bin/llama-perplexity (llama.cpp from llama-cpp-python $llama_version)"
