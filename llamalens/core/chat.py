"""Chat templates: a conversation becomes the prompt text llama.cpp would feed the model.

    messages (--chat PROMPT, --system, --messages FILE.jsonl)
        └─► template: the GGUF's tokenizer.chat_template        (Jinja, rendered here with jinja2)
                      --chat-template FILE                       (Jinja, rendered here with jinja2)
                      --chat-template NAME (chatml, gemma, ...)  (llama.cpp's C++ templates,
                                                                  llama_chat_apply_template)
        └─► prompt text ──► Model.prompt_tokens: BOS + the text with special tokens parsed

Jinja templates are rendered the way llama.cpp's chat-template engine (common/chat.cpp, common/jinja)
renders them: trim_blocks and lstrip_blocks on, the variables `messages`, `bos_token` and `eos_token`
(the model's BOS / EOS pieces), `add_generation_prompt` true, and the functions `raise_exception` and
`strftime_now`. Then, as common_chat_template_direct_apply does, a leading bos_token is cut off when the
model adds BOS itself, so that tokenizing the text does not double it. llama-server tokenizes the result
with special tokens parsed; Model.prompt_tokens does the same, so the tokens equal the server's.

A template written for another model family (chatml's <|im_start|> on Gemma) renders markers the model
does not know: tokenized, they are plain text, and the model sees a conversation in a format it was never
trained on. `foreign_markers` finds them (the template's own tag-like markers, outside the messages, that are
not one special token of this model) and the commands warn.

The rendered text is the prompt from then on: the engine, the store and `sweep --resume` work on it as on
any prompt, and whatever is generated, scored or chosen after it is the assistant's reply. `ChatPrompt`
keeps what it came from (messages, template) so that reports can show the prompt token by token, special
tokens visible, with the place where the reply starts.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from llamalens.errors import InvalidInput

ROLES = ("system", "user", "assistant", "tool")
MAX_RENDERED = 16_000_000  # characters one rendered conversation may have (millions of tokens: past any context)
TEMPLATE_SECONDS = 5.0  # the most rendering one conversation may take


@dataclass(frozen=True)
class ChatPrompt:
    """One conversation rendered for a model: `text` is the prompt its reply follows."""

    messages: tuple[dict, ...]
    template: str  # "gguf", "file:PATH" or "builtin:NAME"
    text: str
    shown: str = ""  # the prompt as the model reads it, special tokens in ⟦ ⟧ (BOS included): see as_read
    n_tokens: int = 0
    foreign: tuple[str, ...] = ()  # the template's markers that are not special tokens of the model

    def warning(self) -> str | None:
        """What to say when the template's markers are plain text to this model (None when they are not)."""
        if not self.foreign:
            return None
        return (f"the chat template ({self.template}) writes {', '.join(self.foreign)}, which "
                f"{'is not a special token' if len(self.foreign) == 1 else 'are not special tokens'} of this model: "
                "it reads them as plain text, in a format it was not trained on. Use the model's own template "
                "(leave out --chat-template) or one whose markers are its special tokens (for Gemma: "
                "--chat-template gemma).")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["messages"] = list(self.messages)
        return d


# -- conversations, before any model is loaded ---------------------------------------------------------
def check_messages(messages, where: str) -> tuple[dict, ...]:
    """OpenAI-style messages: a non-empty list of {"role": ..., "content": "..."}; InvalidInput naming `where`."""
    if not isinstance(messages, list) or not messages:
        raise InvalidInput(f"{where}: \"messages\" must be a non-empty list of "
                           '{"role": "user", "content": "..."} objects')
    out = []
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InvalidInput(f"{where}: message {i} is not an object with a string \"role\" and a string "
                               f"\"content\"; write it as {{\"role\": \"user\", \"content\": \"Hello\"}}")
        if m["role"] not in ROLES:
            raise InvalidInput(f"{where}: message {i} has role {m['role']!r}; use one of {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})
    return tuple(out)


def read_messages(path: str, option: str = "--messages") -> list[tuple[dict, ...]]:
    """The conversations of a .jsonl file: one JSON object with a "messages" list per line."""
    from llamalens.inputs import json_line, read_utf8

    p = Path(path)
    text = read_utf8(p, option)
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        obj = json_line(line, f"{option}: {p} line {n}", 'each line holds one conversation, e.g. '
                        '{"messages": [{"role": "user", "content": "Hello"}]}')
        if not isinstance(obj, dict) or "messages" not in obj:
            raise InvalidInput(f"{option}: {p} line {n} has no \"messages\" field; each line holds one conversation, "
                               'e.g. {"messages": [{"role": "user", "content": "Hello"}]}')
        out.append(check_messages(obj["messages"], f"{option}: {p} line {n}"))
    if not out:
        raise InvalidInput(f"{option}: {p} holds no conversations; one JSON object with \"messages\" per line")
    return out


def conversation(user: str | None, system: str | None = None) -> tuple[dict, ...]:
    """The conversation of --chat PROMPT [--system TEXT]."""
    msgs = [{"role": "system", "content": system}] if system is not None else []
    if user is not None:
        msgs.append({"role": "user", "content": user})
    return tuple(msgs)


def conversations(prompts, system: str | None = None, messages=None, where: str = "--messages"
                  ) -> list[tuple[dict, ...]]:
    """The conversations of a chat run: each prompt as a user message (after `system` when given), then
    `messages`: the path of a .jsonl file of conversations (named `where` in errors) or a list of message
    lists (the Python API's)."""
    convs = [conversation(p, system) for p in prompts]
    if isinstance(messages, (str, Path)):
        convs += [with_system(c, system) for c in read_messages(str(messages), where)]
    elif messages is not None:
        if not isinstance(messages, (list, tuple)):
            raise InvalidInput(f"{where} takes a list of conversations (each a list of {{\"role\", \"content\"}} "
                               "dicts) or the path of a .jsonl file of them")
        convs += [with_system(check_messages(list(c), f"messages[{i}]"), system) for i, c in enumerate(messages)]
    return convs


def with_system(messages: tuple[dict, ...], system: str | None) -> tuple[dict, ...]:
    """--system in front of a conversation from a file (refused when the file has its own system message)."""
    if system is None:
        return messages
    if messages and messages[0]["role"] == "system":
        raise InvalidInput("--system: the conversation already starts with a system message; drop --system or "
                           "the file's system message")
    return ({"role": "system", "content": system},) + tuple(messages)


# -- templates ---------------------------------------------------------------------------------------------
def check_template_name(chat_template: str | None, names: list[str] | None = None) -> None:
    """--chat-template names a file or one of llama.cpp's built-in templates (checked before a model loads)."""
    if chat_template is None:
        return
    if names is None:
        from llamalens.core.runtime import builtin_chat_templates

        names = builtin_chat_templates()
    if chat_template not in names and not Path(chat_template).is_file():
        raise InvalidInput(f"--chat-template {chat_template!r} is neither a file nor one of llama.cpp's built-in "
                           f"templates ({', '.join(names)})")


def resolve_template(model, chat_template: str | None) -> tuple[str, str | None]:
    """(label, Jinja source or None for a built-in) for --chat-template FILE|NAME, or the model's own template."""
    from llamalens.core.runtime import builtin_chat_templates

    names = builtin_chat_templates()
    if chat_template is None:
        src = model.chat_template()
        if not src:
            raise InvalidInput(f"{model.path.name} has no chat template (no tokenizer.chat_template in the GGUF); "
                               f"give one with --chat-template NAME (llama.cpp's built-ins: {', '.join(names)}) or "
                               "--chat-template FILE.jinja")
        return "gguf", src
    if chat_template in names:
        return f"builtin:{chat_template}", None
    check_template_name(chat_template, names)
    p = Path(chat_template)
    from llamalens.inputs import read_utf8

    return f"file:{p}", read_utf8(p, "--chat-template")


class _Refused(Exception):
    """raise_exception() called by the template itself."""


class _TooLarge(Exception):
    """The template would build a string (or number) past MAX_RENDERED."""


def _bounded_environment():
    """jinja2's immutable sandbox (no attribute or file access, ranges capped) that also refuses to build a
    string, list or number past MAX_RENDERED by one operator ('A' * 10**9, '%0999999999d', 10 ** 10 ** 9):
    those allocate in one C call, which no time limit can stop."""
    import re

    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    width = re.compile(r"%[-#0 +]*(\d+)?(?:\.(\d+))?")

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**", "%"])

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, k in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(k, int) and len(seq) * k > MAX_RENDERED:
                        raise _TooLarge(f"{len(seq)} × {k}")
            elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
                if right * max(abs(left).bit_length(), 1) > 8 * MAX_RENDERED:
                    raise _TooLarge(f"{left} ** {right}")
            elif operator == "%" and isinstance(left, str):
                if any(int(g) > MAX_RENDERED for m in width.finditer(left) for g in m.groups() if g):
                    raise _TooLarge(f"a format width in {left[:40]!r}")
            return super().call_binop(context, operator, left, right)

    return Bounded(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])


def render_jinja(source: str, messages, bos_token: str, eos_token: str, add_generation_prompt: bool = True,
                 where: str = "the chat template") -> str:
    """A Jinja chat template rendered as llama.cpp's engine renders it (see the module docstring), in a sandbox
    bounded in time (TEMPLATE_SECONDS) and size (MAX_RENDERED characters): a template is untrusted code (a
    GGUF's own included), and whatever it raises is its failure, named as such."""
    import jinja2

    from llamalens.limits import TimeLimitExceeded, time_limit

    def raise_exception(message):
        raise _Refused(str(message))

    env = _bounded_environment()
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    fix = "give another with --chat-template"
    try:
        with time_limit(TEMPLATE_SECONDS, f"rendering {where}", f"it may loop without end; {fix}"):
            tmpl = env.from_string(source)
            parts, size = [], 0
            for part in tmpl.generate(messages=[dict(m) for m in messages], bos_token=bos_token,
                                      eos_token=eos_token, add_generation_prompt=add_generation_prompt,
                                      raise_exception=raise_exception,
                                      strftime_now=lambda fmt: datetime.now().strftime(fmt)):
                size += len(part)
                if size > MAX_RENDERED:
                    raise _TooLarge(f"more than {MAX_RENDERED:,} characters")
                parts.append(part)
            return "".join(parts)
    except _Refused as e:
        raise InvalidInput(f"{where} refused this conversation: {e}") from None
    except _TooLarge as e:
        raise InvalidInput(f"{where} builds text past the {MAX_RENDERED:,}-character limit ({e}); {fix}") from None
    except jinja2.TemplateSyntaxError as e:
        raise InvalidInput(f"{where} is not valid Jinja (line {e.lineno}: {e.message}); fix it or "
                           f"{fix}") from None
    except TimeLimitExceeded:
        raise
    except RecursionError:
        raise InvalidInput(f"{where} recurses without end (a macro that calls itself?); {fix}") from None
    except Exception as e:  # noqa: BLE001 - the template is code: {{ 1/0 }}, {% include %}, "%d" % "x", ...
        raise InvalidInput(f"{where} failed to render ({type(e).__name__}: {e}); {fix}") from None


def render(model, messages, chat_template: str | None = None, resolved: tuple[str, str | None] | None = None
           ) -> ChatPrompt:
    """The prompt text of a conversation for `model`, ready for the assistant's reply (`resolved`: what
    resolve_template gave, when the caller already looked the template up)."""
    label, source = resolved or resolve_template(model, chat_template)
    if source is None:
        text = model.apply_builtin_template(label.split(":", 1)[1], list(messages))
    else:
        bos, eos = (model.piece(t).decode("utf-8", errors="replace") if t != -1 else "" for t in (model.bos, model.eos))
        where = "the model's chat template" if label == "gguf" else f"--chat-template {label[5:]}"
        text = render_jinja(source, messages, bos, eos, where=where)
        if model.add_bos and bos and text.startswith(bos):
            text = text[len(bos):]
    shown, n = as_read(model, text)
    return ChatPrompt(tuple(messages), label, text, shown, n, foreign_markers(model, text, messages))


# tag-like markers a chat template writes: <|im_start|>, <start_of_turn>, </s>, [INST], [/INST]
MARKER = re.compile(r"<\|[^<>|\s]{1,40}\|>|</?[A-Za-z_][\w.-]{0,40}>|\[/?[A-Z][A-Z_]{1,20}\]")


def foreign_markers(model, text: str, messages) -> tuple[str, ...]:
    """The markers the template wrote around the messages (their own text left out) that are not one special
    token of `model`, in order of first appearance."""
    scaffold = text
    for m in messages:
        content = m.get("content") or ""
        if isinstance(content, str) and content:
            scaffold = scaffold.replace(content, "\x00", 1)
    out = []
    for marker in dict.fromkeys(MARKER.findall(scaffold)):
        ids = model.tokenize(marker, add_bos=False, special=True)
        if not (len(ids) == 1 and model.piece(ids[0], special=True) != model.piece(ids[0], special=False)):
            out.append(marker)
    return tuple(out)


def as_read(model, text: str) -> tuple[str, int]:
    """(the prompt token by token as the model reads it, its token count): special tokens (those whose text
    only shows when rendered as special, such as <bos> and <start_of_turn>) are put in ⟦ ⟧."""
    parts = []
    ids = model.prompt_tokens(text)
    for t in ids:
        special, plain = model.piece(t, special=True), model.piece(t, special=False)
        piece = special.decode("utf-8", errors="replace")
        parts.append(f"\u27e6{piece}\u27e7" if special != plain else piece)
    return "".join(parts), len(ids)


def render_all(model, conversations, chat_template: str | None = None) -> list[ChatPrompt]:
    """Every conversation rendered (the template is looked up once)."""
    resolved = resolve_template(model, chat_template)
    return [render(model, c, resolved=resolved) for c in conversations]
