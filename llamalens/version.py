"""The version of llamalens, in one place (the package, `--version` and every stored run read it)."""

__version__ = "0.1.0"
