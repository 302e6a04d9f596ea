"""scripts/cpu_flags.py and scripts/build_flags.sh: the CMake flags llama.cpp is built with (no llama.cpp needed)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "cpu_flags.py"

_spec = importlib.util.spec_from_file_location("cpu_flags", SCRIPT)
cpu_flags = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cpu_flags)

BASE = "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht syscall nx"
# Haswell-like: AVX2 and friends, no AVX-512
AVX2_ONLY = BASE + " pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 movbe popcnt aes xsave avx f16c rdrand bmi1 avx2 bmi2"
# Cascade Lake / Zen 4-like: AVX-512 with VNNI and BF16, no AMX
AVX512 = (AVX2_ONLY + " avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni avx512_bf16 avx512vbmi avx512ifma")
# Sapphire Rapids-like (this project's dev machine): AVX-512, AVX-VNNI, FP16 and AMX advertised
AMX = AVX512 + " avx_vnni avx512_fp16 avx512_vbmi2 avx512_bitalg amx_bf16 amx_int8 amx_tile"

AMX_OFF = "-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
SAFE = ("-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_F16C=ON -DGGML_FMA=ON -DGGML_BMI2=ON "
        "-DGGML_AVX2=ON -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF "
        "-DGGML_AVX512_BF16=OFF " + AMX_OFF)


def run(*args: str, **env: str) -> str:
    e = {k: v for k, v in os.environ.items() if k not in ("CMAKE_ARGS", "LLAMALENS_SAFE_FLAGS")}
    e.update(env)
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          check=True, env=e).stdout.strip()


def test_avx2_only_cpu_gets_avx2_and_nothing_past_it():
    assert run("--flags", AVX2_ONLY, "--machine", "x86_64", "--system", "Linux") == SAFE
    assert run("--flags", AVX2_ONLY, "--machine", "x86_64", "--system", "Linux", "--features") == \
        "SSE4.2 AVX F16C FMA BMI2 AVX2 (AMX off)"


def test_avx512_cpu_with_vnni_and_bf16_gets_them():
    assert run("--flags", AVX512, "--machine", "x86_64", "--system", "Linux") == (
        "-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_F16C=ON -DGGML_FMA=ON -DGGML_BMI2=ON "
        "-DGGML_AVX2=ON -DGGML_AVX_VNNI=OFF -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON "
        "-DGGML_AVX512_BF16=ON " + AMX_OFF)


def test_amx_advertising_cpu_gets_avx512_but_never_amx():
    args = run("--flags", AMX, "--machine", "x86_64", "--system", "Linux")
    assert args == (
        "-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_F16C=ON -DGGML_FMA=ON -DGGML_BMI2=ON "
        "-DGGML_AVX2=ON -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON "
        "-DGGML_AVX512_BF16=ON " + AMX_OFF)
    assert "-march=native" not in args and "AMX_TILE=ON" not in args and "AMX_INT8=ON" not in args
    assert run("--flags", AMX, "--machine", "x86_64", "--system", "Linux", "--features") == (
        "SSE4.2 AVX F16C FMA BMI2 AVX2 AVX-VNNI AVX-512(F,CD,VL,DQ,BW) AVX-512-VBMI AVX-512-VNNI "
        "AVX-512-BF16 (AMX off)")


def test_safe_fallback_stops_at_avx2_whatever_the_cpu():
    for flags in (AVX2_ONLY, AVX512, AMX):
        assert run("--safe", "--flags", flags, "--machine", "x86_64", "--system", "Linux") == SAFE


def test_partial_avx512_is_not_enabled():
    # Knights Landing-like: avx512f/cd without bw/vl/dq; -mavx512bw etc. would not run there
    args = cpu_flags.cmake_args(frozenset((AVX2_ONLY + " avx512f avx512cd avx512_vnni").split()), "x86_64", "Linux")
    assert "-DGGML_AVX512=OFF" in args and "-DGGML_AVX512_VNNI=OFF" in args


def test_old_cpu_without_avx2():
    args = cpu_flags.cmake_args(frozenset((BASE + " ssse3 sse4_1 sse4_2 popcnt").split()), "x86_64", "Linux")
    assert args[:3] == ["-DGGML_NATIVE=OFF", "-DGGML_SSE42=ON", "-DGGML_AVX=OFF"]
    assert "-DGGML_AVX2=OFF" in args and not [a for a in args[2:] if a.endswith("=ON")]


@pytest.mark.parametrize("machine,system", [("aarch64", "Linux"), ("arm64", "Darwin"), ("x86_64", "Darwin"),
                                            ("riscv64", "Linux")])
def test_non_x86_linux_and_macos_keep_native_defaults(machine, system):
    assert run("--flags", AMX, "--machine", machine, "--system", system) == ""
    assert run("--flags", "", "--machine", machine, "--system", system, "--features") == \
        f"llama.cpp's native defaults ({system} {machine})"


def test_unreadable_cpuinfo_on_x86_gets_the_safe_set(tmp_path):
    assert run("--cpuinfo", str(tmp_path / "none"), "--machine", "x86_64", "--system", "Linux") == SAFE


def test_reads_the_flags_line_of_a_cpuinfo_file(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: {AVX512}\nbugs\t\t: spectre_v1\n\n"
                    f"processor\t: 1\nflags\t\t: {AVX512}\n")
    assert cpu_flags.read_cpuinfo_flags(str(info)) == frozenset(AVX512.split())
    assert "-DGGML_AVX512=ON" in run("--cpuinfo", str(info), "--machine", "x86_64", "--system", "Linux").split()


def test_describe():
    assert run(f"--describe={SAFE}", "--machine", "x86_64", "--system", "Linux") == "SSE4.2 AVX F16C FMA BMI2 AVX2 (AMX off)"
    assert run("--describe=-DGGML_CUDA=on") == "as set by CMAKE_ARGS: -DGGML_CUDA=on"


def _build_flags(**env: str) -> tuple[str, str]:
    """(cmake_args, safe_cmake_args) as scripts/build_flags.sh sets them, sourced from the repo root."""
    e = {k: v for k, v in os.environ.items() if k not in ("CMAKE_ARGS", "LLAMALENS_SAFE_FLAGS")}
    e.update(env, PYTHON=sys.executable)
    out = subprocess.run(["bash", "-c", '. scripts/build_flags.sh; printf "%s\\n%s\\n" "$cmake_args" "$safe_cmake_args"'],
                         cwd=ROOT, capture_output=True, text=True, check=True, env=e).stdout
    args, safe = out.split("\n")[:2]
    return args, safe


def test_build_flags_sh_uses_the_detection():
    args, safe = _build_flags()
    assert args == run()
    if args != run("--safe"):
        assert safe == run("--safe")
    else:
        assert safe == ""  # nothing safer to fall back to


def test_cmake_args_wins():
    args, safe = _build_flags(CMAKE_ARGS="-DGGML_CUDA=on -DGGML_AVX512=OFF")
    assert (args, safe) == ("-DGGML_CUDA=on -DGGML_AVX512=OFF", "")


def test_safe_flags_on_request():
    args, safe = _build_flags(LLAMALENS_SAFE_FLAGS="1")
    assert args == run("--safe") and safe == ""
