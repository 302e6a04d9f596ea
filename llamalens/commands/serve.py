"""serve: the explorer in the browser and an OpenAI-compatible API (llamalens/serve/); show_tree: a tree run."""

from __future__ import annotations

import secrets
import socket

import click

from llamalens.commands.options import GroupedCommand, model_options, pop_model_options, store_option
from llamalens.commands.output import fail_cleanly, json_out, load_model, print_table, say
from llamalens.commands.confidence import confidence_json, show_answer_confidence
from llamalens.core.chat import check_template_name, resolve_template
from llamalens.errors import InvalidInput
from llamalens.visible import visible

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def listening(host: str, port: int) -> socket.socket:
    """A socket bound to host:port and listening (0: any free port), or a clear error: clients that connect
    before the server runs wait in its backlog."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(64)
    except OSError as e:
        s.close()
        raise InvalidInput(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port, or --port 0 "
                           "for any free one") from None
    return s


def allowed_hosts(host: str, port: int) -> tuple[set[str], set[str]]:
    """(Host header values, Origins) the server answers to: its address, and localhost when bound locally."""
    names = {host} | (set(LOCAL_HOSTS) if host in LOCAL_HOSTS else set())
    hosts = {f"[{n}]:{port}" if ":" in n else f"{n}:{port}" for n in names}
    return hosts, {f"http://{h}" for h in hosts}


MIN_TOKEN = 16  # characters of a token given with --token


def check_token(token: str | None) -> str | None:
    """A --token (LLAMALENS_TOKEN) long enough not to be guessed, and of URL-safe characters (it is printed in the
    URL to open and sent back in a header)."""
    if token is None or token == "":
        return None
    if len(token) < MIN_TOKEN or not all(c.isascii() and (c.isalnum() or c in "-._~") for c in token):
        raise InvalidInput(f"--token must be at least {MIN_TOKEN} characters of A-Z, a-z, 0-9, '-', '.', '_' or '~' "
                           f"(got {len(token)} characters); leave it out for a random one")
    return token


@click.command(cls=GroupedCommand)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Another than 127.0.0.1 lets other machines in (with the token).")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True, help="Port (0: any free one).")
@click.option("--token", default=None, envvar="LLAMALENS_TOKEN", help="Access token [default: a new random one].")
@click.option("--exact", is_flag=True, help="Decode every branch's prompt anew instead of reusing the cells it shares: "
                                            "slower, and the tokens and numbers of `llamalens generate`.")
@click.option("--chat-template", default=None, help="Template for chats: a llama.cpp built-in name or a .jinja file "
                                                    "[default: the model's own].")
@store_option
@model_options
@fail_cleanly
def serve(host, port, token, exact, chat_template, store_path, model, **kw):
    """Explore the model in the browser: generate, click a token to see what else it weighed and what the sampler
    chain did, branch from any token and compare the branches; an OpenAI-compatible API (/v1/completions,
    /v1/chat/completions, with logprobs) beside it. Every branch is stored (a run of kind `tree`).

    \b
    llamalens serve                  then open the URL it prints
    """
    import uvicorn

    from llamalens.serve.app import make_app
    from llamalens.serve.explorer import Explorer
    from llamalens.store import Store, default_store_path

    if host not in LOCAL_HOSTS:
        say(f"warning: listening on {host}: anyone who can reach this port and has the token can run the model",
            err=True)
    token = check_token(token) or secrets.token_urlsafe(24)
    check_template_name(chat_template)  # an unknown name before the model loads, as every other command
    options = pop_model_options(kw)
    store_path = store_path or default_store_path()
    Store(store_path).close()  # a path that is not a store fails here, before the model loads
    sock = listening(host, port)
    port = sock.getsockname()[1]
    loaded = load_model(model, options, sequences=2)
    if chat_template is not None:
        resolve_template(loaded, chat_template)  # a file read (bounded, UTF-8) now, not at the first chat request
    explorer = Explorer(loaded, store_path, exact=exact, chat_template=chat_template)
    hosts, origins = allowed_hosts(host, port)
    server = uvicorn.Server(uvicorn.Config(make_app(explorer, token, hosts, origins), log_level="warning",
                                           access_log=False, timeout_graceful_shutdown=3))
    shown = f"[{host}]" if ":" in host else host
    say(f"llamalens serve: http://{shown}:{port}/?token={token}")
    say(f"  OpenAI-compatible API at http://{shown}:{port}/v1 (api_key = the token); runs stored in {store_path}; "
        "Ctrl-C stops", err=True)
    try:
        server.run(sockets=[sock])
    finally:
        explorer.close()
        loaded.close()
        sock.close()


def show_tree(store, run_id, as_json, texts: bool = False, answer: str | None = None):
    """Print a tree run: its branches, each indented under its parent, with where it forked and the start of its
    text (texts=True: then each branch's whole text)."""
    from llamalens.run.tree import load_tree

    tree = load_tree(store, run_id)
    if as_json:
        json_out({**tree.to_dict(), "confidence": confidence_json(store, run_id, answer)})
        return tree
    info = tree.info
    say(f"run {info.id} {visible(info.name or '')} [{info.status}] tree of {len(tree.branches)} branch(es), model "
        f"{info.model.name}")
    say(f"prompt: {visible(tree.prompt[-200:])}")
    rows = [("branch", "from", "forced", "tokens", "mean lp", "finish", "text")]
    for i in _depth_first(tree):
        b = tree.branches[i]
        depth = _depth(tree, i)
        path = tree.path(i)
        mean = sum(t.logprob for t in path) / len(path) if path else float("nan")
        forced = "".join(t.text for t in b.forced)
        rows.append(("  " * depth + str(i), "" if b.parent is None else f"{b.parent}@{b.at}", visible(forced),
                     len(path), f"{mean:.3f}", b.finish_reason or b.status, visible(b.text[:60])))
    print_table(rows, right={3, 4})
    show_answer_confidence(store, run_id, answer)
    if texts:
        for i in _depth_first(tree):
            say(f"--- branch {i}")
            say("".join(t.text for t in tree.path(i) if not t.eog))
    return tree


def _depth(tree, i: int) -> int:
    d = 0
    while tree.branches[i].parent is not None:
        i, d = tree.branches[i].parent, d + 1
    return d


def _depth_first(tree) -> list[int]:
    children: dict = {}
    for i, b in sorted(tree.branches.items()):
        children.setdefault(b.parent, []).append(i)
    out, todo = [], list(reversed(children.get(None, [])))
    while todo:
        i = todo.pop()
        out.append(i)
        todo.extend(reversed(children.get(i, [])))
    return out
