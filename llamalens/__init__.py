"""llamalens: what a language model thinks, token by token."""
__version__ = "0.1.0"
