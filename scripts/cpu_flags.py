#!/usr/bin/env python3
"""The CMake flags llama.cpp is built with on this machine (stdlib only: runs before .venv exists).

    python3 scripts/cpu_flags.py              cmake args for this CPU (x86-64: its AVX/AVX2/AVX-512 set)
    python3 scripts/cpu_flags.py --safe       the safe fallback: at most AVX2 (the pre-issue-15 build)
    python3 scripts/cpu_flags.py --features   the CPU features those args enable, one line, for humans
    python3 scripts/cpu_flags.py --describe "ARGS"   the same for a given set of cmake args
    ... --flags "fma avx2 ..." --machine x86_64 --system Linux    describe another machine (tests)

x86-64 (Linux, or anything with /proc/cpuinfo): GGML_NATIVE=OFF and every GGML_<ISA> option set
explicitly ON or OFF from the CPU's flags, so nothing depends on ggml's defaults (they flip with
SOURCE_DATE_EPOCH or cross-compiling). AMX is always OFF: `-march=native` on a CPU that advertises
AMX defines __AMX_INT8__, which compiles in ggml's AMX backend, and that crashed
(general protection fault in ggml_backend_amx_mul_mat); with explicit flags only -mamx-* would define
it, and this script never passes GGML_AMX_*=ON. macOS (Apple Silicon or Intel) and other architectures
(aarch64, ...) get no args: llama.cpp's native defaults, which have no AMX path to worry about.
An x86-64 machine whose flags cannot be read gets the safe AVX2 set, as before.
"""
from __future__ import annotations

import argparse
import platform
import sys

# (GGML option, cpuinfo flags it needs, short name printed for humans); order is the printed order.
# GGML_AVX512 adds -mavx512f -mavx512cd -mavx512vl -mavx512dq -mavx512bw, so it needs all five.
X86_OPTIONS = [
    ("GGML_SSE42", ("sse4_2",), "SSE4.2"),
    ("GGML_AVX", ("avx",), "AVX"),
    ("GGML_F16C", ("f16c",), "F16C"),
    ("GGML_FMA", ("fma",), "FMA"),
    ("GGML_BMI2", ("bmi2",), "BMI2"),
    ("GGML_AVX2", ("avx2",), "AVX2"),
    ("GGML_AVX_VNNI", ("avx_vnni",), "AVX-VNNI"),
    ("GGML_AVX512", ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"), "AVX-512(F,CD,VL,DQ,BW)"),
    ("GGML_AVX512_VBMI", ("avx512vbmi",), "AVX-512-VBMI"),
    ("GGML_AVX512_VNNI", ("avx512_vnni",), "AVX-512-VNNI"),
    ("GGML_AVX512_BF16", ("avx512_bf16",), "AVX-512-BF16"),
]
AVX512_EXTENSIONS = {"GGML_AVX512_VBMI", "GGML_AVX512_VNNI", "GGML_AVX512_BF16"}
# What the safe fallback may use: the AVX2-era set, which every supported x86-64 CPU runs.
SAFE_OPTIONS = {"GGML_SSE42", "GGML_AVX", "GGML_F16C", "GGML_FMA", "GGML_BMI2", "GGML_AVX2"}
AMX_OPTIONS = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")
# Used where an x86-64 CPU's flags cannot be read (no /proc/cpuinfo): what every build used to get.
FALLBACK_FLAGS = frozenset({"sse4_2", "avx", "f16c", "fma", "bmi2", "avx2"})


def read_cpuinfo_flags(path: str = "/proc/cpuinfo") -> frozenset[str] | None:
    """The first processor's `flags` line, or None where there is no such file or line."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == "flags":
                    return frozenset(value.split())
    except OSError:
        return None
    return None


def is_x86_64(machine: str) -> bool:
    return machine.lower() in ("x86_64", "amd64", "x64")


def x86_options(flags: frozenset[str], safe: bool = False) -> list[tuple[str, bool]]:
    """Each GGML option with ON/OFF for a CPU with these cpuinfo flags; AMX always OFF."""
    chosen: list[tuple[str, bool]] = []
    on: set[str] = set()
    for option, needs, _ in X86_OPTIONS:
        enabled = all(n in flags for n in needs)
        if option in AVX512_EXTENSIONS and "GGML_AVX512" not in on:
            enabled = False  # -mavx512vnni etc. without the AVX-512 base would not be a usable build
        if safe and option not in SAFE_OPTIONS:
            enabled = False
        if enabled:
            on.add(option)
        chosen.append((option, enabled))
    chosen.extend((option, False) for option in AMX_OPTIONS)
    return chosen


def cmake_args(flags: frozenset[str] | None, machine: str, system: str, safe: bool = False) -> list[str]:
    if system == "Darwin" or not is_x86_64(machine):
        return []
    if flags is None:
        flags = FALLBACK_FLAGS
    args = ["-DGGML_NATIVE=OFF"]
    args += [f"-D{option}={'ON' if enabled else 'OFF'}" for option, enabled in x86_options(flags, safe)]
    return args


def features(args: list[str], machine: str, system: str) -> str:
    """A one-line description of what the args build for."""
    if not args:
        return f"llama.cpp's native defaults ({system} {machine})"
    names = {option: name for option, _, name in X86_OPTIONS}
    on = [names[a[2:-3]] for a in args if a.endswith("=ON") and a[2:-3] in names]
    return " ".join(on) + " (AMX off)" if on else "baseline x86-64 (no AVX; AMX off)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--safe", action="store_true", help="the safe fallback: nothing past AVX2")
    p.add_argument("--features", action="store_true", help="print the features, not the cmake args")
    p.add_argument("--describe", metavar="ARGS", help="print the features of these cmake args and exit")
    p.add_argument("--flags", help="cpuinfo flags to use instead of this machine's (space-separated)")
    p.add_argument("--cpuinfo", default="/proc/cpuinfo", help="file to read the flags from")
    p.add_argument("--machine", default=platform.machine(), help="as `uname -m` (default: this one)")
    p.add_argument("--system", default=platform.system(), help="as `uname -s` (default: this one)")
    a = p.parse_args(argv)
    if a.describe is not None:
        given = a.describe.split()
        ours = {"GGML_NATIVE"} | {o for o, _, _ in X86_OPTIONS} | set(AMX_OPTIONS)
        if not all(g.startswith("-D") and g[2:].split("=")[0] in ours for g in given):
            print("as set by CMAKE_ARGS: " + a.describe)
        else:
            print(features(given, a.machine, a.system))
        return 0
    flags = frozenset(a.flags.split()) if a.flags is not None else read_cpuinfo_flags(a.cpuinfo)
    args = cmake_args(flags, a.machine, a.system, a.safe)
    print(features(args, a.machine, a.system) if a.features else " ".join(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
