"""Chat templates (llamalens/core/chat.py and --chat, --system, --chat-template, --messages on generate, next, score,
choose and sweep): rendered prompt tokens against llama-cpp-python's own Jinja2ChatFormatter and tokenizer, the
built-in templates against their documented formats, the reply's numbers against llama-cpp-python's logits,
and every bad input."""

import json

import numpy as np
import pytest

from llamalens.core.chat import check_messages, read_messages, render
from llamalens.errors import InvalidInput
from llamalens.reports import document
from llamalens.reports.texts import chat_blocks
from llamalens.core.runtime import Model, ModelOptions
from reference import log_softmax
from test_cli import run as cli
from tiny_gguf import TINY_CHAT_TEMPLATE, write_tiny_gguf

CONVERSATIONS = [
    [{"role": "user", "content": "the cat"}],
    [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "the cat sat"}],
    [{"role": "system", "content": "hello"}, {"role": "user", "content": "the cat"},
     {"role": "assistant", "content": "sat on the mat"}, {"role": "user", "content": "and the dog?"}],
    [{"role": "user", "content": "a user typing </s> and <s> gets them parsed, as llama-server does"}],
]


@pytest.fixture(scope="module")
def chat_path(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("chat") / "tiny-chat.gguf", chat_template=TINY_CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def chat_model(chat_path):
    with Model(chat_path, ModelOptions(ctx=256, flash_attn="off")) as m:
        yield m


@pytest.fixture(scope="module")
def chat_llama(chat_path):
    from llama_cpp import Llama

    return Llama(str(chat_path), n_ctx=256, logits_all=True, verbose=False, flash_attn=False)


def write_jsonl(path, conversations):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations), encoding="utf-8")
    return path


def test_prompt_tokens_equal_llama_cpp_pythons_jinja2_formatter(chat_model, chat_llama):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    # the reference: llama-cpp-python's formatter on the same template and its own tokenizer, as its chat
    # handler feeds the model (the rendered text keeps <s>; tokenized without adding BOS, specials parsed)
    formatter = Jinja2ChatFormatter(TINY_CHAT_TEMPLATE, eos_token="</s>", bos_token="<s>")
    for conv in CONVERSATIONS:
        rendered = render(chat_model, conv)
        assert rendered.template == "gguf"
        ref = formatter(messages=conv).prompt
        ref_ids = chat_llama.tokenize(ref.encode("utf-8"), add_bos=False, special=True)
        assert chat_model.prompt_tokens(rendered.text) == ref_ids, conv
        assert ref_ids[0] == chat_model.bos and ref_ids.count(chat_model.bos) == 1 + conv[-1]["content"].count("<s>")
        assert rendered.n_tokens == len(ref_ids)
    # trim_blocks / lstrip_blocks matter for this template: without them the text differs
    import jinja2

    loose = jinja2.Environment().from_string(TINY_CHAT_TEMPLATE).render(
        messages=CONVERSATIONS[1], bos_token="<s>", eos_token="</s>", add_generation_prompt=True)
    assert loose != formatter(messages=CONVERSATIONS[1]).prompt


def test_shown_prompt_marks_special_tokens(chat_model):
    r = render(chat_model, CONVERSATIONS[0])
    assert r.text.startswith("[user] the cat</s>")  # BOS is not doubled: the model adds it
    assert r.shown.startswith("\u27e6<s>\u27e7") and "\u27e6</s>\u27e7" in r.shown
    assert r.shown.replace("\u27e6", "").replace("\u27e7", "").lstrip("<s>").strip().startswith("[user]")


def test_builtin_templates_match_their_documented_formats(gemma):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    # Gemma's format (its model card): no system role, the system text joins the first user turn
    assert render(gemma, conv, "gemma").text == \
        "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert render(gemma, conv[1:], "chatml").text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    # Gemma's turn markers are special tokens of its vocabulary; chatml's are plain text to it, and said so
    assert render(gemma, conv, "gemma").foreign == ()
    assert render(gemma, conv[1:], "chatml").foreign == ("<|im_start|>", "<|im_end|>")
    ids = gemma.prompt_tokens(render(gemma, conv[1:], "gemma").text)
    turn = gemma.tokenize("<start_of_turn>", special=True)
    assert len(turn) == 1 and ids[:2] == [gemma.bos, turn[0]]  # a special token, parsed as one


def test_markers_the_model_does_not_know_are_warned(chat_path, chat_model, tmp_path):
    """A template's markers that are not special tokens of the model are named, once, on stderr and in reports;
    its own template's, and markers a user typed in a message, are not."""
    own = render(chat_model, CONVERSATIONS[0])
    assert "</s>" in own.text and own.foreign == () and own.warning() is None
    other = render(chat_model, CONVERSATIONS[0], "chatml")
    assert other.foreign == ("<|im_start|>", "<|im_end|>") and "are not special tokens" in other.warning()
    assert render(chat_model, [{"role": "user", "content": "I typed <|im_start|> and [INST]"}]).foreign == ()
    res = cli("next", "the cat", "--chat", "-m", chat_path, "--ctx", 256, "--chat-template", "chatml", "--top", 2)
    assert res.output.count("warning: the chat template (builtin:chatml) writes <|im_start|>, <|im_end|>") == 1
    assert "warning" not in cli("next", "the cat", "--chat", "-m", chat_path, "--ctx", 256, "--top", 2).output
    doc = document.Document("t")
    chat_blocks(doc, [other, own])
    assert [b.kind for b in doc.blocks if isinstance(b, document.Para)].count("warn") == 1
    # the API says it too (a Python warning, as its other notes), for a sweep and a fork
    import warnings

    import llamalens as ll

    for call in (lambda st: ll.sweep("the cat", {"temperature": [0]}, max_tokens=2, chat=True, chat_template="chatml",
                                     model=chat_model, store=st, progress=False),
                 lambda st: ll.fork("the cat", chat=True, chat_template="chatml", samples=1, alternatives=1,
                                    positions="0-0", max_tokens=2, model=chat_model, store=st, progress=False)):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            call(tmp_path / "api.db")
        assert sum("writes <|im_start|>, <|im_end|>" in str(w.message) for w in seen) == 1


def test_template_file_and_errors(chat_model, tiny, tmp_path):
    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>", encoding="utf-8")
    assert render(chat_model, CONVERSATIONS[0], str(f)).text == "<user>the cat<assistant>"
    with pytest.raises(InvalidInput, match="no chat template .*--chat-template NAME"):
        render(tiny, CONVERSATIONS[0])
    with pytest.raises(InvalidInput, match="neither a file nor one of llama.cpp's built-in"):
        render(chat_model, CONVERSATIONS[0], "no-such-template")
    f.write_text("{% for m in messages %}", encoding="utf-8")
    with pytest.raises(InvalidInput, match="is not valid Jinja"):
        render(chat_model, CONVERSATIONS[0], str(f))
    with pytest.raises(InvalidInput, match="refused this conversation: a conversation cannot start with a tool"):
        render(chat_model, [{"role": "tool", "content": "x"}])


def test_messages_files(tmp_path):
    good = write_jsonl(tmp_path / "c.jsonl", CONVERSATIONS)
    assert [list(c) for c in read_messages(str(good))] == CONVERSATIONS
    for body, problem in [("not json\n", "line 1 is not JSON"), ('{"prompt": "x"}\n', 'no "messages"'),
                          ('{"messages": []}\n', "non-empty list"),
                          ('{"messages": [{"role": "user", "content": 3}]}\n', "message 1 is not an object"),
                          ('{"messages": [{"role": "robot", "content": "x"}]}\n', "role 'robot'"), ("\n", "no conv")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(body, encoding="utf-8")
        with pytest.raises(InvalidInput, match=problem):
            read_messages(str(bad))
    with pytest.raises(InvalidInput, match="non-empty list"):
        check_messages("hi", "x")


def test_generate_chat_is_the_rendered_prompt(chat_path, chat_model, tmp_path):
    res = cli("generate", "the cat", "--chat", "--system", "hello", "-m", chat_path, "--ctx", 256, "-t", 0, "-n", 4,
              "--json")
    d = json.loads(res.stdout)
    assert d["chat"]["template"] == "gguf" and d["chat"]["messages"][0] == {"role": "system", "content": "hello"}
    rendered = render(chat_model, CONVERSATIONS[2][:1] + CONVERSATIONS[0])
    assert d["prompt"] == rendered.text
    # the same tokens as generating from the rendered text itself: the chat is only the prompt
    raw = json.loads(cli("generate", rendered.text, "-m", chat_path, "--ctx", 256, "-t", 0, "-n", 4, "--json").stdout)
    assert [t["id"] for t in d["tokens"]] == [t["id"] for t in raw["tokens"]]
    # a messages file, and --chat-template by name; bad combinations
    conv = write_jsonl(tmp_path / "one.jsonl", [CONVERSATIONS[1]])
    d = json.loads(cli("next", "--messages", conv, "-m", chat_path, "--chat-template", "chatml", "--json",
                       "--top", 3).stdout)
    assert d["chat"]["template"] == "builtin:chatml" and d["prompt"].endswith("<|im_start|>assistant\n")
    many = write_jsonl(tmp_path / "many.jsonl", CONVERSATIONS)
    assert "works on one conversation" in cli("generate", "--messages", many, "-m", chat_path, ok=False).output
    assert "PROMPT or --messages FILE, not both" in cli("next", "x", "--messages", conv, "-m", chat_path,
                                                        ok=False).output
    res = cli("generate", "--chat", "hi", "-m", chat_path.parent / "none.gguf", ok=False)
    assert res.exit_code != 0 and "Traceback" not in res.output


def test_no_template_is_a_clear_error(tiny_path):
    res = cli("generate", "--chat", "the cat", "-m", tiny_path, ok=False)
    assert res.exit_code != 0 and "no chat template" in res.output and "--chat-template" in res.output
    assert "Traceback" not in res.output


def test_score_and_choose_the_reply_against_llama_cpp_python(chat_path, chat_model, chat_llama, tmp_path):
    conv = CONVERSATIONS[2][:2] + [{"role": "assistant", "content": "the dog sat"}]
    f = write_jsonl(tmp_path / "reply.jsonl", [conv])
    d = json.loads(cli("score", "--messages", f, "-m", chat_path, "--ctx", 256, "--flash-attn", "off", "--json").stdout)
    prompt = render(chat_model, conv[:2]).text
    prompt_ids = chat_llama.tokenize(prompt.encode(), add_bos=True, special=True)
    # the reply's tokens: the rendered prompt + reply tokenized as one text, the prompt's tokens cut off
    whole = chat_llama.tokenize((prompt + "the dog sat").encode(), add_bos=True, special=True)
    assert whole[: len(prompt_ids)] == prompt_ids
    reply_ids = whole[len(prompt_ids):]
    assert [t["id"] for t in d["tokens"]] == reply_ids
    # reference: llama-cpp-python's own logits for prompt + reply, log-softmax in numpy
    chat_llama.reset()
    chat_llama.eval(prompt_ids + reply_ids)
    ref = log_softmax(np.array(chat_llama.scores[len(prompt_ids) - 1: len(prompt_ids) + len(reply_ids) - 1]))
    got = np.array([t["logprob"] for t in d["tokens"]])
    # measured max |diff| 2.2e-6 (prompt and reply decoded in two batches here, one there); bound 10x that
    assert np.abs(got - ref[np.arange(len(reply_ids)), reply_ids]).max() < 2.2e-5
    # TEXT as the reply to a conversation that ends with the user
    f2 = write_jsonl(tmp_path / "ask.jsonl", [conv[:2]])
    d2 = json.loads(cli("score", "the dog sat", "--messages", f2, "-m", chat_path, "--ctx", 256, "--flash-attn", "off",
                        "--json").stdout)
    assert [t["logprob"] for t in d2["tokens"]] == [t["logprob"] for t in d["tokens"]]
    assert "ends with a user message" in cli("score", "--messages", f2, "-m", chat_path, ok=False).output
    assert "needs the conversation" in cli("score", "x", "--chat", "-m", chat_path, ok=False).output
    # choose: the options are replies, appended to the rendered prompt as they are
    d = json.loads(cli("choose", "the cat", "--chat", "--system", "hello", "-m", chat_path, "--flash-attn", "off",
                       "--option", "the dog sat",
                       "--option", "on the mat", "--json").stdout)
    by = {o["option"]: o for o in d["options"]}
    assert by["the dog sat"]["continuation"] == "the dog sat"
    assert by["the dog sat"]["logprob"] == pytest.approx(sum(t["logprob"] for t in d2["tokens"]), abs=1e-4)


def test_sweep_messages_and_report(chat_path, tmp_path, chromium_path):
    f = write_jsonl(tmp_path / "c.jsonl", CONVERSATIONS[:2])
    store, report = tmp_path / "runs.db", tmp_path / "chat.html"
    res = cli("sweep", "--messages", f, "-m", chat_path, "--ctx", 256, "-t", 0, "-n", 3, "--store", store, "--report",
              report, "--json")
    from llamalens.store import Store

    info = Store(str(store)).run(json.loads(res.stdout)["run"]["id"])
    assert [c["messages"] for c in info.options.chats] == CONVERSATIONS[:2]
    assert list(info.options.prompts) == [c["text"] for c in info.options.chats]
    html = report.read_text(encoding="utf-8")
    assert "Chat prompts" in html and "\u27e6&lt;s&gt;\u27e7" in html and "\u25b6reply" in html
    from browser import Browser

    with Browser() as b:  # in the browser: the messages' markup is text, the special tokens are marked
        page = b.open(report)
        assert page.problems() == []
        cells = page.eval("Array.from(document.querySelectorAll('td')).map(e => e.textContent)")
        shown = [c for c in cells if c.endswith("\u25b6reply")]
        assert len(shown) == 2 and all(c.startswith("\u27e6<s>\u27e7") for c in shown)
