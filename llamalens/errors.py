"""Named exceptions. Every message names the problem and the fix; the CLI prints it on one line."""


class LlamalensError(Exception):
    """A problem the user can fix. The message says what is wrong and what to do."""


class ModelNotFound(LlamalensError):
    """A --model path that does not exist, or a name that matches no known model."""


class InvalidModelFile(LlamalensError):
    """A file that is not GGUF, or a GGUF that is truncated or corrupt."""


class InvalidSettings(LlamalensError):
    """Sampling or run settings out of range."""


class PromptTooLong(LlamalensError):
    """A prompt (plus the tokens to generate) that does not fit the context."""


class InvalidInput(LlamalensError):
    """Any other bad input: empty text, unreadable file, malformed prompts file."""


class InvalidArgument(InvalidInput, TypeError):
    """A Python API argument of the wrong type (a text where a list belongs, a number where a text belongs):
    also a TypeError, as Python code expects, with a message naming the argument."""


class StoreError(LlamalensError):
    """The run store cannot be opened, written, or does not hold what was asked for."""


class RayError(LlamalensError):
    """Ray is missing, unreachable, or has no worker left to do the work."""


class MissingExtra(LlamalensError):
    """A feature whose optional dependency (a pyproject extra) is not installed; the message names the extra."""
