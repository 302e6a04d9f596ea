"""The one C extension: llamalens/core/_kernels.c (see its header), optional: where it cannot be built the package installs
without it and stats.py runs its numpy passes. Everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("llamalens.core._kernels", ["llamalens/core/_kernels.c"], extra_compile_args=["-O3"],
                             optional=True)])
