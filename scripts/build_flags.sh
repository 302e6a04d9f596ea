# Sourced by install.sh and build_llama_tools.sh: the pinned llama-cpp-python version and the CMake
# flags llama.cpp is built with. On x86-64 the default avoids -march=native (it crashes on CPUs that
# advertise AMX) and AVX-512 (not every CPU has it); a user's CMAKE_ARGS wins (CUDA, Metal, ...).
llama_version=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml)
if [ -n "${CMAKE_ARGS:-}" ]; then
  cmake_args="$CMAKE_ARGS"
elif [ "$(uname -m)" = "x86_64" ]; then
  cmake_args="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
else
  cmake_args=""
fi
