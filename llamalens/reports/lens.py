"""The report of a logit lens: the layers x positions heatmap (each cell the top token, coloured by its
probability, its entropy or its KL to the model's final distribution; hover for the alternatives), the per-layer
curves of the followed tokens' probability and rank, and a table per position."""

from __future__ import annotations

from llamalens.reports.document import Document, Figure, Heading, KeyValues, Para, Strips, Table, TokenView, kld_class, \
    kld_scale, prob_class
from llamalens.reports.texts import model_line
from llamalens.visible import prob_text, visible


def _entropy_class(h: float) -> str:
    return f"e{min(9, max(0, int(h)))}"


def _view(cell, scale) -> TokenView:
    top = cell.top[0]
    values = [prob_text(top.prob), f"{cell.entropy:.3f}", f"{cell.kl_to_final:.4f}",
              f"{cell.final.rank} (p {prob_text(cell.final.prob)})"]
    values += [f"{t.rank} (p {prob_text(t.prob)})" for t in cell.target]
    return TokenView(visible(top.text), top.id,
                     f"{prob_class(top.prob)} {_entropy_class(cell.entropy)} {kld_class(cell.kl_to_final, scale)}",
                     values, [[(visible(t.text), prob_text(t.prob)) for t in cell.top]], notable=cell.kl_to_final)


def curves(result):
    """Per layer, at the last position looked at: each followed token's probability and rank (the final answer
    first, then the targets)."""
    from matplotlib.ticker import MaxNLocator

    from llamalens.reports.plots import PALETTE, _figure, _plain_ticks

    last = result.positions[-1]
    fig = _figure(10, 4.6)
    ax_p, ax_r = fig.subplots(2, 1, sharex=True)
    followed = [(f"final answer {visible(last.layers[-1].final.text)}", [c.final for c in last.layers])]
    followed += [(f"target {visible(t['text'])}", [c.target[q] for c in last.layers])
                 for q, t in enumerate(result.targets)]
    for k, (label, points) in enumerate(followed):
        style = {"color": PALETTE[k % len(PALETTE)], "marker": ".", "lw": 2.6 if k == 0 else 1.2,
                 "ls": ":" if k == 0 else "-", "zorder": 3 if k else 2}  # the answer drawn under a target it equals
        ax_p.plot(result.layers, [p.prob for p in points], label=label, **style)
        ax_r.plot(result.layers, [p.rank for p in points], **style)
    ax_p.set_ylabel("probability")
    ax_p.set_ylim(0, 1.02)
    ax_r.set_ylabel("rank (1 = top)")
    ax_r.set_yscale("log")
    ax_r.invert_yaxis()
    _plain_ticks(ax_r.yaxis)
    ax_r.set_xlabel("layer (the residual stream after it)")
    ax_r.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_p.legend(fontsize=8, loc="upper left", frameon=False)
    return fig


def pair_figure(result):
    """Two models: KL(A || B) at every (layer, position) as a heatmap, and per layer its mean over the positions
    with the share of positions whose top tokens agree."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    from llamalens.reports.plots import PALETTE, _figure

    kl = np.array([[p.layers[k].other.kl for p in result.positions] for k in range(len(result.layers))])
    fig = _figure(12, 4.6)
    ax_h, ax_l = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2], "wspace": 0.3})
    image = ax_h.imshow(kl, aspect="auto", origin="lower", cmap="magma_r", interpolation="nearest",
                        extent=(-0.5, len(result.positions) - 0.5, -0.5, len(result.layers) - 0.5))
    fig.colorbar(image, ax=ax_h, label="KL(A || B), nats")
    ticks = range(0, len(result.positions), max(1, len(result.positions) // 16))
    ax_h.set_xticks(list(ticks), [f"{result.positions[i].position} {visible(result.positions[i].token)[:8]}"
                                  for i in ticks], rotation=60, ha="right", fontsize=7)
    lticks = range(0, len(result.layers), max(1, len(result.layers) // 10))
    ax_h.set_yticks(list(lticks), [str(result.layers[i]) for i in lticks])
    ax_h.set_xlabel("position")
    ax_h.set_ylabel("layer")
    rows = result.by_layer()
    ax_l.plot([r["mean_kl"] for r in rows], result.layers, color=PALETTE[1], marker=".", label="mean KL(A || B)")
    ax_l.set_xlabel("mean KL(A || B), nats", color=PALETTE[1])
    ax_l.set_ylabel("layer")
    ax_l.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax_s = ax_l.twiny()
    ax_s.plot([r["same_top"] for r in rows], result.layers, color=PALETTE[0], marker=".", ls=":")
    ax_s.set_xlim(0, 1.02)
    ax_s.set_xlabel("share of positions with the same top token", color=PALETTE[0])
    return fig


MAX_HEAD_PANELS = 16


def attention_figure(result):
    """--attention: one panel per head, its rows the layers and its columns the prompt's tokens up to the position
    looked at, each cell the weight that head of that layer gives the token (a layer x head grid of bars)."""
    import numpy as np

    from llamalens.reports.plots import _figure

    att = result.attention
    weights = np.array([a["heads"] for a in att["layers"]])  # [layers, heads, positions]
    n_head = min(weights.shape[1], MAX_HEAD_PANELS)
    cols = min(n_head, 4)
    n_rows = -(-n_head // cols)
    n_pos = weights.shape[2]
    fig = _figure(min(16, 2.2 + 3.4 * cols), 0.6 + n_rows * (0.9 + 0.16 * weights.shape[0]))
    axes = np.atleast_1d(fig.subplots(n_rows, cols, squeeze=False)).reshape(-1)
    labels = [visible(t)[:8] for t in result.tokens[:n_pos]]
    step = max(1, n_pos // 14)
    for h, ax in enumerate(axes):
        if h >= n_head:
            ax.set_visible(False)
            continue
        image = ax.imshow(weights[:, h, :], aspect="auto", origin="lower", cmap="Blues", vmin=0, vmax=1,
                          interpolation="nearest")
        ax.set_title(f"head {h}", fontsize=9)
        ax.set_xticks(list(range(0, n_pos, step)), labels[::step], rotation=60, fontsize=7, ha="right")
        lsteps = range(0, weights.shape[0], max(1, weights.shape[0] // 8))
        ax.set_yticks(list(lsteps), [str(att["layers"][i]["layer"]) for i in lsteps], fontsize=7)
        if h % cols == 0:
            ax.set_ylabel("layer")
    fig.colorbar(image, ax=list(axes[:n_head]), label="attention weight", shrink=0.8)
    return fig


def _attention_section(doc, result) -> None:
    att = result.attention
    n_head = len(att["layers"][0]["heads"])
    doc.add(Heading("Where it looked"))
    doc.add(Figure(attention_figure(result), "lens_attention",
                   f"The attention weights of position {att['position']} ({visible(result.tokens[att['position']])}) "
                   f"over the prompt's tokens, per layer (rows) and head (panels)"
                   + (f"; the first {MAX_HEAD_PANELS} of {n_head} heads" if n_head > MAX_HEAD_PANELS else "") + "."),
            Para("Computed with flash attention off (which never forms these weights). Each row sums to 1 over "
                 "positions 0 to the one looked at; later positions are masked. The whole table: --json, or "
                 "to_pandas('attention') in Python.", "note"))
    shown = min(n_head, MAX_HEAD_PANELS)
    rows = []
    for a in att["layers"]:
        best = [max(range(len(row)), key=row.__getitem__) for row in a["heads"][:shown]]
        rows.append([a["layer"], *[f"{k} {visible(result.tokens[k])} {row[k]:.2f}" for k, row in zip(best, a["heads"])]])
    doc.add(Para("Per layer, each head's most attended position, its token and weight:"),
            Table(["layer", *[f"head {h}" for h in range(shown)]], rows))


def _pair_section(doc, result) -> None:
    other = result.other
    check = other["final_check"]
    doc.add(Heading("Two models, layer by layer"))
    doc.add(KeyValues([
        ("model A", model_line(result.model)), ("model B", model_line(other["model"])),
        ("B's last layer vs its logits", f"max |Δ logprob| {check['max_abs_logprob_diff']:.2e} nats; same top 10: "
                                         f"{'yes' if check['same_top10'] else 'no'}")]))
    rows = result.by_layer()
    parted = next((r["layer"] for r in rows if r["same_top"] < 1), None)
    doc.add(Figure(pair_figure(result), "lens_pair",
                   "KL(A || B) between the two models' lenses at each cell (A the first model), and per layer its "
                   "mean and the share of positions whose top tokens agree."),
            Para("Their top tokens agree at every position and layer." if parted is None else
                 f"Their top tokens first differ at layer {parted}.", "note"))
    doc.add(Table(["layer", "mean KL(A || B)", "max KL(A || B)", "same top token"],
                  [[r["layer"], round(r["mean_kl"], 5), round(r["max_kl"], 5), f"{r['same_top']:.0%}"]
                   for r in rows]))


def _findings(result) -> list[str]:
    last = result.positions[-1]
    out = []
    final = last.layers[-1].final
    settle = last.settles_at
    out.append(f"At the last position ({last.position}, after {visible(last.token)}) the model's answer is "
               f"{visible(final.text)} (p {prob_text(final.prob)}); " +
               (f"it is the top token from layer {settle} on." if settle is not None else "it is never the top token."))
    for q, t in enumerate(result.targets):
        first = next((c.layer for c in last.layers if c.target[q].rank == 1), None)
        best = min(last.layers, key=lambda c: c.target[q].rank)
        out.append(f"Target {visible(t['text'])}: " + (f"first the top token at layer {first}; " if first is not None
                                                       else f"never the top token (best rank {best.target[q].rank} "
                                                            f"at layer {best.layer}); ")
                   + f"p {prob_text(last.layers[-1].target[q].prob)} at the last layer.")
    return out


def lens_document(result) -> Document:
    """A LensResult (run/lens.py) as a report document."""
    targets = [f"target {visible(t['text'])} rank" for t in result.targets]
    scale = kld_scale([c.kl_to_final for p in result.positions for c in p.layers])
    title = "llamalens lens" + (f" (run {result.run_id})" if result.run_id is not None else "")
    doc = Document(title, fields=["p", "entropy", "KL to final", "final answer rank", *targets],
                   alt_titles=["top tokens at this layer"],
                   modes=[("prob", "probability"), ("entropy", "entropy"), ("kld", "KL to final")], kld_scale=scale)
    check = result.final_check
    head = result.head
    doc.add(KeyValues([
        ("model", model_line(result.model)), ("prompt", visible(result.prompt[-300:], edge_spaces=False)),
        ("head", f"{head['output']} ({head['output_type']}, products rounded as llama.cpp's {head['activation_rounding']}"
                 f"), RMSNorm eps {head['rms_eps']:.3g}"
                 + (f", logit soft-cap {head['final_logit_softcapping']}" if head["final_logit_softcapping"] else "")),
        ("last layer vs the model's logits", f"max |Δ logprob| {check['max_abs_logprob_diff']:.2e} nats; same top 10: "
                                             f"{'yes' if check['same_top10'] else 'no'}"),
        ("targets", ", ".join(visible(t["text"]) for t in result.targets) or "none")]))
    doc.add(Para(" ".join(_findings(result))))
    for note in result.notes:
        doc.add(Para(note, "note"))
    doc.add(Heading("What each layer would predict"))
    index = {layer: k for k, layer in enumerate(result.layers)}
    rows = [(f"layer {layer}" + (" (last)" if layer == result.n_layer - 1 else ""),
             [_view(p.layers[index[layer]], scale) for p in result.positions]) for layer in reversed(result.layers)]
    doc.add(Strips("Top next token per layer and position", rows,
                   columns=[f"{p.position} {visible(p.token)}" for p in result.positions]),
            Para("Each column is a position of the prompt (its token on top); each cell the token the model's final "
                 "norm and output matrix predict next from the residual stream after that layer. Hover or focus a cell "
                 "for its top tokens.", "note"))
    doc.add(Heading("The followed tokens, layer by layer"))
    doc.add(Figure(curves(result), "lens_curves",
                   f"At position {result.positions[-1].position}: probability and rank at each layer."))
    if result.other is not None:
        _pair_section(doc, result)
    if result.attention is not None:
        _attention_section(doc, result)
    doc.add(Heading("Positions"))
    doc.add(Table(["position", "token", "next in the prompt", "final answer", "p", "top from layer"],
                  [[p.position, visible(p.token), "" if p.next is None else visible(p.next),
                    visible(p.layers[-1].final.text), round(p.layers[-1].final.prob, 4),
                    "never" if p.settles_at is None else p.settles_at] for p in result.positions]))
    return doc


def write_lens_report(store, info, path, fmt, *, write, **_options) -> None:
    """A lens run's report written to `path` (the lens kind's report, run/kinds.py)."""
    from llamalens.reports.document import check_writable, report_format
    from llamalens.run.lens import load_lens

    report_format(path, fmt)
    check_writable(path)
    write(lens_document(load_lens(store, info.id)), path, fmt)


def lens_run_document(run) -> Document:
    """A Run of kind lens in a notebook: its report."""
    from llamalens.run.lens import load_lens

    return lens_document(load_lens(run.store, run.id))

