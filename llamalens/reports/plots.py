"""Plots for the reports, drawn with matplotlib's object API (Figure + Agg canvas, never pyplot).

Each function takes plain data (lists, arrays, DataFrames) and returns a Figure; `svg()` and `png()`
serialise it. Token texts reach the plots only through `visible.visible`, and math-text parsing is
off, so a token such as `$x$` or `<script>` is drawn literally (SVG text is XML-escaped by
matplotlib). Every SVG gets its own id salt so that several inline SVGs on one page never share ids.
"""

from __future__ import annotations

import io
import itertools
import math
import warnings

import numpy as np

_RC = {"text.parse_math": False, "svg.fonttype": "none", "font.size": 9, "axes.titlesize": 9,
       "axes.spines.top": False, "axes.spines.right": False}
_salt = itertools.count()
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22"]


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.rcParams.update(_RC)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _plain_ticks(axis) -> None:
    """Tick labels as plain numbers (math text is off, so log axes would show raw TeX)."""
    from matplotlib.ticker import FuncFormatter

    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def svg(fig) -> str:
    """The figure as an inline <svg> element (no XML prolog), with ids unique on the page."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": f"llamalens-{next(_salt)}"}), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # missing glyphs (emoji, CJK) are drawn as boxes, not errors
        # no RDF metadata block: it names web addresses (creativecommons.org, purl.org, matplotlib.org) a page
        # that fetches nothing has no use for; only the SVG and XLink namespace names remain
        fig.savefig(buf, format="svg", metadata={"Creator": None, "Date": None, "Format": None, "Type": None})
    text = buf.getvalue()
    return text[text.index("<svg"):]


def png(fig, dpi: int = 110) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def heatmaps(summary, metric: str, x: str, y: str | None, panel: list[str]):
    """`metric` of each configuration over two setting axes, one panel per value of the others."""
    keys = sorted({tuple(r[a] for a in panel) for _, r in summary.iterrows()}) if panel else [()]
    xs = sorted(summary[x].unique())
    ys = sorted(summary[y].unique()) if y else [None]
    n = len(keys)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = _figure(min(3.4 * cols, 10.5), 0.5 + rows * (0.45 * len(ys) + 1.2))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    vals = summary[metric].astype(float)
    finite = vals[np.isfinite(vals)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
    if vmin == vmax:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    im = None
    for ax, key in zip(axes, keys):
        grid = np.full((len(ys), len(xs)), np.nan)
        sub = summary
        for a, v in zip(panel, key):
            sub = sub[sub[a] == v]
        for _, r in sub.iterrows():
            grid[ys.index(r[y]) if y else 0, xs.index(r[x])] = r[metric]
        im = ax.imshow(grid, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=8,
                        color="white" if (v - vmin) / (vmax - vmin) < 0.55 else "black")
        ax.set_xticks(range(len(xs)), [f"{v:g}" for v in xs])
        ax.set_xlabel(x)
        ax.set_yticks(range(len(ys)), [f"{v:g}" for v in ys] if y else [""])
        if y:
            ax.set_ylabel(y)
        ax.set_title(", ".join(f"{a}={v:g}" for a, v in zip(panel, key)) or metric)
    for ax in axes[n:]:
        ax.set_visible(False)
    if im is not None:
        fig.colorbar(im, ax=axes[:n].tolist(), label=metric, shrink=0.9)
    return fig


def positions(curves: dict[str, dict[str, np.ndarray]]):
    """Per position, one line (or bar group) per configuration: p(chosen), entropy, candidates."""
    fig = _figure(10, 6.2 + 0.16 * math.ceil(len(curves) / 2))
    ax_p, ax_h, ax_c = fig.subplots(3, 1, sharex=True)
    n = len(curves)
    width = 0.8 / max(n, 1)
    for k, (label, c) in enumerate(curves.items()):
        color = PALETTE[k % len(PALETTE)]
        x = np.arange(len(c["prob"]))
        if n <= 4:
            ax_p.bar(x - 0.4 + width * (k + 0.5), c["prob"], width=width, color=color, label=label)
        else:
            ax_p.plot(x, c["prob"], marker=".", lw=1, color=color, label=label)
        ax_h.plot(x, c["entropy"], lw=1.2, color=color)
        ax_c.step(x, c["candidates"], where="mid", lw=1.2, color=color)
    ax_p.set_ylabel("p(chosen token)")
    ax_p.set_ylim(0, 1.02)
    ax_h.set_ylabel("entropy (nats)")
    ax_c.set_ylabel("candidates")
    ax_c.set_yscale("symlog", linthresh=1)
    _plain_ticks(ax_c.yaxis)
    ax_c.set_xlabel("generated token position")
    if n:
        handles, labels = ax_p.get_legend_handles_labels()
        fig.legend(handles, labels, fontsize=7, ncol=2 if n > 3 else 1, loc="outside lower center", frameon=False)
    return fig


def sampler_stages(top_labels: list[str], raw: list[float], chains: list[tuple[str, list[float], int]]):
    """Raw top-N probabilities (grey) and what each configuration's chain makes of them (colour)."""
    n = len(chains)
    fig = _figure(10, 0.6 + 1.9 * n)
    axes = np.atleast_1d(fig.subplots(n, 1, sharex=True, squeeze=False)).ravel()
    x = np.arange(len(top_labels))
    for k, (ax, (label, final, survivors)) in enumerate(zip(axes, chains)):
        ax.bar(x - 0.2, raw, width=0.4, color="#bbbbbb", label="raw")
        ax.bar(x + 0.2, final, width=0.4, color=PALETTE[k % len(PALETTE)], label="after the chain")
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("p")
        ax.set_title(f"{label}: {survivors:,} candidate{'s' if survivors != 1 else ''} left", loc="left")
    axes[0].legend(fontsize=7, loc="upper right", frameon=False)
    axes[-1].set_xticks(x, top_labels, rotation=60, ha="right", fontsize=8)
    return fig


def series(values, ylabel: str, xlabel: str = "token position", log: bool = False):
    """One value per position (e.g. per-token KLD or surprise along a text)."""
    fig = _figure(10, 2.4)
    ax = fig.subplots()
    v = np.asarray(values, dtype=float)
    ax.plot(np.arange(len(v)), v, lw=0.8, color=PALETTE[0])
    if log:
        ax.set_yscale("symlog", linthresh=1e-4)
        _plain_ticks(ax.yaxis)
    ax.set_ylabel(ylabel)
    ax.set_xlabel(xlabel)
    return fig


def log_bins(v: np.ndarray, n: int = 40) -> np.ndarray:
    """n log-spaced bin edges from v's min to its max (at least a decade wide). 10**log10(x) need not give x
    back (2297 comes out as 2296.999999), so the end edges are set to the data's own min and max: no value
    falls outside the histogram."""
    lo, hi = float(v.min()), float(max(v.max(), v.min() * 10))
    edges = np.logspace(math.log10(lo), math.log10(hi), n)
    edges[0], edges[-1] = lo, hi
    return edges


def histogram(values, xlabel: str, log_x: bool = False):
    fig = _figure(6, 2.6)
    ax = fig.subplots()
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if log_x:
        v = np.maximum(v, 1e-8)
        bins = log_bins(v) if len(v) else 10
        ax.set_xscale("log")
        _plain_ticks(ax.xaxis)
    else:
        bins = 40
    ax.hist(v, bins=bins, color=PALETTE[0])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("tokens")
    return fig


def category_colours(categories: list[str]) -> dict[str, str]:
    """A colour per category, in order of first appearance (PALETTE, then tab20; colours repeat past 20)."""
    import matplotlib

    names = list(dict.fromkeys(categories))
    colours = PALETTE if len(names) <= len(PALETTE) else [matplotlib.colors.to_hex(c)
                                                          for c in matplotlib.colormaps["tab20"].colors]
    return {c: colours[k % len(colours)] for k, c in enumerate(names)}


def _category_legend(fig, colours: dict[str, str], label_width: int = 30) -> None:
    from matplotlib.patches import Patch

    from llamalens.visible import label

    names = list(colours)
    # handles and labels given explicitly: matplotlib would drop an automatic label that starts with "_"
    fig.legend([Patch(color=colours[c]) for c in names], [label(c, label_width) for c in names], title="category",
               fontsize=8, loc="outside lower center", ncol=min(len(names), 5), frameon=False)


def similarity(matrix: np.ndarray, labels: list[str], groups: list[str] | None = None):
    """A square matrix of cosine similarities, each cell labelled (labels are plain text, not TeX).

    groups: each row's category, rows already grouped: tick labels take the category's colour, each
    category's block on the diagonal is outlined, and a legend names them."""
    from matplotlib.patches import Rectangle

    n = len(labels)
    side = min(10.5, 1.6 + 0.55 * n)
    fig = _figure(side + 1.2, side)
    ax = fig.subplots()
    m = np.asarray(matrix, dtype=float)
    off = m[~np.eye(n, dtype=bool)] if n > 1 else m.ravel()
    vmin, vmax = (float(off.min()), float(off.max())) if off.size else (0.0, 1.0)
    if vmin == vmax:
        vmin, vmax = vmin - 0.05, vmax + 0.05
    shown = m.copy()
    np.fill_diagonal(shown, np.nan)  # 1 by definition: left blank so the scale shows the pairs
    im = ax.imshow(shown, cmap="viridis", vmin=vmin, vmax=vmax)
    if n <= 24:
        for (i, j), v in np.ndenumerate(m):
            if i != j:
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7 if n > 12 else 8,
                        color="white" if (v - vmin) / (vmax - vmin) < 0.55 else "black")
    ax.set_xticks(range(n), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    fig.colorbar(im, ax=ax, label="cosine similarity", shrink=0.8)
    if groups:
        colours = category_colours(groups)
        for ticks in (ax.get_xticklabels(), ax.get_yticklabels()):
            for tick, g in zip(ticks, groups):
                tick.set_color(colours[g])
        start = 0
        for k in range(1, n + 1):
            if k == n or groups[k] != groups[start]:
                ax.add_patch(Rectangle((start - 0.5, start - 0.5), k - start, k - start, fill=False, lw=2.2,
                                       edgecolor=colours[groups[start]]))
                start = k
        _category_legend(fig, colours)
    return fig


MAX_MAP_LABELS = 150  # points labelled on a map; past that the labels would hide the points


def embedding_map(x, y, labels: list[str], categories: list[str] | None = None, xlabel: str = "", ylabel: str = ""):
    """Texts as points in 2-D, each labelled (up to MAX_MAP_LABELS) and coloured by its category, with a legend."""
    n = len(labels)
    fig = _figure(10, 7.2 if categories else 6.8)
    ax = fig.subplots()
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    colours = category_colours(categories) if categories else {None: PALETTE[0]}
    cats = np.array(categories if categories else [None] * n, dtype=object)
    for c, colour in colours.items():
        m = cats == c
        ax.scatter(x[m], y[m], s=36, color=colour, edgecolors="white", linewidths=0.6, zorder=2)
    if n <= MAX_MAP_LABELS:
        for i in range(n):
            ax.annotate(labels[i], (x[i], y[i]), xytext=(4, 3), textcoords="offset points", fontsize=7.5 if n > 40 else 8.5,
                        color="#222222", zorder=3)
    ax.margins(0.12)  # room for the labels of the outermost points
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, color="#eeeeee", zorder=0)
    if categories:
        _category_legend(fig, colours)
    return fig


def outcome_areas(positions: list[int], series: np.ndarray, labels: list[str], change_points: list[int],
                  forking: list[int], token_labels: list[str]):
    """o_t stacked over the analysed positions (the last row, o_end, drawn at the right edge), with the
    change points as dashed lines and the forking tokens as solid red lines; labels are plain text."""
    fig = _figure(10, 3.2)
    ax = fig.subplots()
    x = np.arange(len(series))
    shown = labels[:9]
    stack = [series[:, k] for k in range(len(shown))]
    if len(labels) > len(shown):
        stack.append(series[:, len(shown):].sum(axis=1))
        shown = shown + [f"{len(labels) - len(shown)} other outcomes"]
    colours = [PALETTE[k % len(PALETTE)] for k in range(len(shown))]
    colours = ["#c8c8c8" if name == "none" else c for name, c in zip(shown, colours)]  # nothing matched: grey
    areas = ax.stackplot(x, *stack, colors=colours, step="mid", alpha=0.85)
    for i in change_points:  # a jump between rows i-1 and i
        ax.axvline(i - 0.5, color="#333", lw=0.8, ls="--")
    for i in forking:
        ax.axvline(i - 0.5, color="#d00", lw=1.6)
    ax.set_xlim(-0.5, len(series) - 0.5)
    ax.set_ylim(0, 1)
    ax.set_ylabel("outcome distribution o_t")
    ticks = list(range(len(positions))) + [len(positions)]
    names = [f"{p} {t}" for p, t in zip(positions, token_labels)] + ["end"]
    step = max(1, len(ticks) // 40)
    ax.set_xticks(ticks[::step], names[::step], rotation=70, ha="right", fontsize=7)
    # handles and labels given explicitly: matplotlib would drop an automatic label that starts with "_"
    ax.legend(areas, shown, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    return fig


def strategy_scatter(points: dict[str, tuple[list[float], list[float]]], xlabel: str, ylabel: str):
    """One marker per sample, one colour per configuration (e.g. sequence logprob against distinct-2: beam
    search finds likelier, more repetitive text; sampling less likely, more varied). Identical samples (the
    seeds of a deterministic strategy) overlap: their count is in the legend."""
    fig = _figure(8, 4.2 + 0.16 * math.ceil(len(points) / 2))
    ax = fig.subplots()
    markers = "osD^v<>Ph*"
    for k, (label, (xs, ys)) in enumerate(points.items()):
        ax.scatter(xs, ys, s=36, alpha=0.75, color=PALETTE[k % len(PALETTE)], marker=markers[k % len(markers)],
                   label=f"{label} ({len(set(zip(xs, ys)))} distinct of {len(xs)})", edgecolors="none")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if points:
        fig.legend(fontsize=7, ncol=2 if len(points) > 3 else 1, loc="outside lower center", frameon=False)
    return fig


def top_tokens(labels: list[str], probs: list[float]):
    """The top-N next tokens' raw probabilities as bars (a NextToken in a notebook)."""
    fig = _figure(max(4.0, 0.45 * len(labels) + 1.5), 2.8)
    ax = fig.subplots()
    x = np.arange(len(labels))
    ax.bar(x, probs, color=PALETTE[0])
    ax.set_ylabel("p (raw)")
    ax.set_ylim(0, max(probs + [0.0]) * 1.1 or 1.0)
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=8)
    return fig


def reliability_diagrams(panels: list[tuple[str, list, str]], bins: int):
    """One reliability diagram per measure (calibrate): each bin's accuracy against its mean implied probability,
    the markers' area by the bin's items, over the diagonal of perfect calibration. `panels`: (title, bins as
    core/calibration.Bin, a note such as the ECE)."""
    cols = min(4, max(1, len(panels)))
    rows = math.ceil(len(panels) / cols) or 1
    fig = _figure(2.6 * cols + 0.4, 2.5 * rows + 0.3)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, (title, got, note) in zip(axes, panels):
        ax.plot([0, 1], [0, 1], color="#999", lw=0.8, ls="--")
        for k in range(1, bins):
            ax.axvline(k / bins, color="#eee", lw=0.6, zorder=0)
        full = [b for b in got if b.n]
        n = sum(b.n for b in full) or 1
        ax.plot([b.mean_prob for b in full], [b.accuracy for b in full], color=PALETTE[0], lw=1)
        ax.scatter([b.mean_prob for b in full], [b.accuracy for b in full], s=[12 + 300 * b.n / n for b in full],
                   color=PALETTE[0], alpha=0.75, edgecolors="none")
        ax.set_xlim(0, 1)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{title}\n{note}", fontsize=8)
        ax.set_xlabel("implied probability", fontsize=7)
        ax.set_ylabel("accuracy", fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return fig


def coverage_curves(curves: dict[str, list[float]], accuracy: float, oracle: list[float]):
    """Accuracy against coverage (the share of questions answered, the surest first), one line per measure, with
    the oracle (every right answer first) and chance (the overall accuracy) for scale."""
    fig = _figure(8, 4.2)
    ax = fig.subplots()
    n = len(oracle)
    x = (np.arange(n) + 1) / max(n, 1)
    ax.plot(x, oracle, color="#333", lw=1, ls=":", label="oracle")
    ax.axhline(accuracy, color="#999", lw=1, ls="--", label="chance (no selection)")
    for k, (label, acc) in enumerate(curves.items()):
        ax.plot((np.arange(len(acc)) + 1) / max(len(acc), 1), acc, color=PALETTE[k % len(PALETTE)], lw=1.3,
                label=label)
    ax.set_xlabel("coverage (share of questions answered, the surest first)")
    ax.set_ylabel("accuracy of the answered")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    fig.legend(fontsize=7, loc="outside right upper", frameon=False)
    return fig


def ladder(labels: list[str], sizes_gib: list[float], means: list[float], p99s: list[float], base: str = ""):
    """A quantization ladder: mean and 99th-percentile KL divergence against the base, by file size (log KLD:
    quantizations span orders of magnitude). Each point is labelled with its model (quantization)."""
    fig = _figure(7.5, 4.2)
    ax = fig.subplots()
    order = np.argsort(sizes_gib, kind="stable")
    x = np.asarray(sizes_gib, dtype=float)[order]
    for values, name, colour, marker in ((means, "mean KLD", PALETTE[0], "o"), (p99s, "99% KLD", PALETTE[1], "s")):
        y = np.maximum(np.asarray(values, dtype=float)[order], 1e-7)  # a KLD of 0 (a bit-identical model) on a log axis
        ax.plot(x, y, marker=marker, color=colour, lw=1.2, label=name)
    for i in order:
        ax.annotate(labels[i], (sizes_gib[i], max(means[i], 1e-7)), textcoords="offset points", xytext=(4, -10),
                    fontsize=7)
    ax.set_yscale("log")
    _plain_ticks(ax.yaxis)
    lo, hi = ax.get_ylim()
    from matplotlib.ticker import FuncFormatter, NullFormatter

    # minor ticks labelled only when the axis spans less than two decades (else they crowd), as plain numbers too
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}") if math.log10(hi / lo) < 2 else NullFormatter())
    ax.set_xlabel("file size (GiB)")
    ax.set_ylabel(f"KL(base‖model), nats per token{f' (base: {base})' if base else ''}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, frameon=False)
    return fig


def histograms(series_by_label: dict[str, list[float]], xlabel: str):
    """Several distributions on one log x axis (e.g. per-token KLD of each compared model), as outlines."""
    fig = _figure(7, 2.8)
    ax = fig.subplots()
    every = [np.maximum(np.asarray(v, dtype=float)[np.isfinite(v)], 1e-8) for v in series_by_label.values()]
    joined = np.concatenate(every) if every else np.array([1e-8])
    bins = log_bins(joined) if len(joined) else 10
    for k, (label, v) in enumerate(zip(series_by_label, every)):
        ax.hist(v, bins=bins, histtype="step", lw=1.3, color=PALETTE[k % len(PALETTE)], label=label)
    ax.set_xscale("log")
    _plain_ticks(ax.xaxis)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("tokens")
    if len(series_by_label) > 1:
        ax.legend(fontsize=7, frameon=False)
    return fig
