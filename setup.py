"""The one C extension: llamalens/_kernels.c (see its header), optional: where it cannot be built the package installs
without it and stats.py runs its numpy passes. Everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("llamalens._kernels", ["llamalens/_kernels.c"], extra_compile_args=["-O3"],
                             optional=True)])
