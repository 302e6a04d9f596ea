# Sourced by install.sh and build_llama_tools.sh: the pinned llama-cpp-python version and the CMake
# flags llama.cpp is built with.
#   cmake_args       what to build with: CMAKE_ARGS when set (CUDA, Metal, ...: it always wins), else
#                    scripts/cpu_flags.py's choice for this CPU (x86-64: GGML_NATIVE=OFF and each
#                    SSE4.2/AVX/AVX2/FMA/F16C/BMI2/AVX-VNNI/AVX-512(F/BW/VL/DQ/CD, VBMI, VNNI, BF16)
#                    option set ON or OFF from /proc/cpuinfo, AMX always OFF; macOS and aarch64: none,
#                    i.e. llama.cpp's native defaults). LLAMALENS_SAFE_FLAGS=1 picks safe_cmake_args.
#   safe_cmake_args  the fallback when a build fails its smoke test: nothing past AVX2 (the flags
#                    every x86-64 install used before); empty where there is no safer choice.
llama_version=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml)
_cpu_py="${PYTHON:-python3}"
if [ -n "${CMAKE_ARGS:-}" ]; then
  cmake_args="$CMAKE_ARGS"
  safe_cmake_args=""
else
  safe_cmake_args=$("$_cpu_py" scripts/cpu_flags.py --safe)
  if [ "${LLAMALENS_SAFE_FLAGS:-0}" = 1 ]; then
    cmake_args="$safe_cmake_args"
  else
    cmake_args=$("$_cpu_py" scripts/cpu_flags.py)
  fi
  [ "$safe_cmake_args" = "$cmake_args" ] && safe_cmake_args=""
fi
# describe_flags ARGS: the CPU features a set of cmake args builds for, in one line
describe_flags() { "$_cpu_py" scripts/cpu_flags.py --describe="$1"; }
