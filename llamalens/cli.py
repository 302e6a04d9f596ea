"""The command line: the `llamalens` group and the registration of each command (llamalens/commands/).

Heavy modules (llama_cpp, numpy, matplotlib) are imported inside commands so that `llamalens --help`
is instant.
"""

from __future__ import annotations

import click

from llamalens.version import __version__
from llamalens.commands import compare, confidence, embed, fork, lens, look, runs, score, serve
from llamalens.commands import eval as eval_command
from llamalens.visible import terminal_safe


def not_utf8(args: list[str]) -> str | None:
    """A message naming the first argument that is not valid UTF-8 (Python keeps such bytes as surrogates)."""
    for i, arg in enumerate(args, 1):
        bad = next((c for c in arg if "\udc80" <= c <= "\udcff"), None) if isinstance(arg, str) else None
        if bad is not None:
            return (f"argument {i} is not valid UTF-8 (byte 0x{ord(bad) - 0xDC00:02X}); llamalens reads text arguments "
                    "as UTF-8: convert it (e.g. with iconv), or put the bytes in a file and score them with "
                    "`llamalens score --file FILE --raw-bytes`")
    return None


class Group(click.Group):
    """The llamalens group: refuses arguments that are not UTF-8, and shows click's own messages (which may
    quote what the user typed) terminal-safe."""

    def make_context(self, info_name, args, parent=None, **extra):
        problem = not_utf8(list(args))
        if problem:
            raise click.UsageError(problem)
        return _safe(lambda: super(Group, self).make_context(info_name, args, parent, **extra))

    def invoke(self, ctx):
        return _safe(lambda: super(Group, self).invoke(ctx))


def _safe(call):
    try:
        return call()
    except click.ClickException as e:
        e.message = terminal_safe(e.message)
        raise


# help wraps at the terminal up to 120 columns (click: 80), so the short help's one-line entries show whole there
@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@click.version_option(__version__, prog_name="llamalens")
def main():
    """llamalens: what a language model thinks, token by token (local GGUF models, llama.cpp).

    \b
    Quick start (embedded Gemma 3 270M model):
      llamalens next "The capital of France is"
      llamalens generate "Once upon a time" --temperature 0.7 --logprobs 5
      llamalens tokenize "Preposterous, I'm flabbergasted!"
      llamalens sweep "The capital of France is" -t 0,0.7 --top-k 2,40 --seeds 2 --report report.html
      llamalens score "The quick brown fox jumps over the lazy dog."
      llamalens choose "The capital of France is" --option Paris --option London
      llamalens embed king queen man woman apple banana
      llamalens fork "Q: Is a bat a bird or a mammal? A:" --options bird,mammal -n 12 --report fork.html
    """


COMMANDS = [look.models, look.quantize, look.tokenize, look.next_cmd, look.generate,
            runs.sweep, runs.presets, runs.runs, runs.show, runs.report, runs.export,
            score.score, score.choose, compare.compare,
            embed.embed, fork.fork, serve.serve, lens.lens,
            confidence.calibrate, eval_command.eval_cmd]
for command in COMMANDS:
    main.add_command(command)


if __name__ == "__main__":  # pragma: no cover
    main()
