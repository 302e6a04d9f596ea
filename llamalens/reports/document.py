"""The report document: format-neutral blocks, rendered as one self-contained HTML page or as
Markdown + PNGs.

    store run / score result / comparison ──► Document (headings, key-value tables, tables, figures,
                                               token strips) ──► to_html(doc)        one file, offline
                                                              └─► write_markdown(doc) FILE.md + FILE_files/*.png

Builders (reports/run.py: a sweep run; reports/texts.py: a scored text, a model comparison, embeddings)
only collect data; the two renderers here are the only code that writes markup.

Safety: every text from a model or a user reaches HTML through `visible.terminal_safe` (ESC, BEL, C1
controls and bidi overrides shown as `\\x1b`, `\\u202e`, ...) and `html.escape`, or through a JSON
block whose `<`, `>` and `&` are \\u-escaped and which the page's script reads with JSON.parse and
puts on screen with textContent only (never innerHTML). Token texts pass through
`visible.visible` first, so spaces at token edges, newlines, tabs, control characters and partial
UTF-8 bytes show as `·`, `⏎`, `⇥`, `<0x07>`, `<0xE2>` instead of vanishing.

Size: token strips carry their tooltips in one JSON block; past MAX_STRIP_TOKENS tokens a report
shows the first samples of each prompt and says how many it left out (`llamalens export` has all).
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from llamalens.errors import InvalidInput, LlamalensError
from llamalens.visible import terminal_safe

MAX_STRIP_TOKENS = 40_000
MAX_PLOT_PROMPTS = 6
MAX_SAMPLER_CHAINS = 8
FORMATS = ("html", "md")


# -- the document model --------------------------------------------------------------------------
@dataclass
class TokenView:
    text: str  # already made visible
    id: int
    classes: str  # colour classes, one per mode: p0..p9 (probability), g0..g3 (GLTR rank), k0..k9 (KLD)
    values: list[str]  # formatted tooltip values, in Document.fields order
    alts: list[list[tuple[str, str]]] = field(default_factory=list)  # per Document.alt_titles: (text, prob)
    notable: float = 0.0  # higher = more worth a look (the Markdown report lists the top few)
    newline: bool = False  # the token ends a line: break the strip after it
    mark: str = ""  # a marker shown before the token (e.g. where two samples diverge)
    plain: str | None = None  # the text as it reads in running prose (real spaces); None: the same as `text`


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str
    kind: str = "p"  # p | note | warn


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Folded:
    """Blocks shown folded under a one-line summary (HTML <details>; a plain section in Markdown)."""

    summary: str
    blocks: list = field(default_factory=list)

    def add(self, *blocks):
        self.blocks.extend(blocks)


@dataclass
class KeyValues:
    rows: list[tuple[str, str]]


@dataclass
class Table:
    header: list[str]
    rows: list[list]
    caption: str = ""
    sortable: bool = True


@dataclass
class Figure:
    fig: object  # a matplotlib Figure
    name: str  # file stem for the Markdown report's PNG
    caption: str = ""


@dataclass
class Strips:
    """Token strips that line up: one row per sample (or text), coloured by the document's modes."""

    title: str
    rows: list[tuple[str, list[TokenView]]]  # (label, tokens)
    context: str = ""  # e.g. the prompt, shown before the rows
    columns: list[str] = field(default_factory=list)  # given: a heatmap grid, a column per entry (rows the same length)


@dataclass
class Document:
    title: str
    blocks: list = field(default_factory=list)
    fields: list[str] = field(default_factory=list)  # tooltip value names
    alt_titles: list[str] = field(default_factory=list)
    modes: list[tuple[str, str]] = field(default_factory=lambda: [("prob", "probability"), ("gltr", "GLTR rank")])
    kld_scale: KldScale | None = None  # the "kld" mode's scale, for its legend (None: KLD_SCALE)

    def add(self, *blocks):
        self.blocks.extend(blocks)


# -- token colouring -------------------------------------------------------------------------------
def prob_class(p: float) -> str:
    return f"p{min(9, max(0, int(p * 10)))}"


def gltr_class(rank: int) -> str:
    return "g0" if rank <= 10 else "g1" if rank <= 100 else "g2" if rank <= 1000 else "g3"


@dataclass(frozen=True)
class KldScale:
    """The KL-divergence colour scale: k0 below 10**start nats, then k1..k9 from edges 10**(start + j·step)."""

    start: float = -4.0  # log10 of the first edge
    step: float = 0.5  # decades per bucket

    def edge(self, i: int) -> float:
        """The lower edge of bucket k_i (i >= 1)."""
        return 10 ** (self.start + (i - 1) * self.step)


KLD_SCALE = KldScale()  # 1e-4 .. 1 nat in half decades: what a good quantization shows


def kld_scale(values) -> KldScale:
    """A scale that spreads these KLDs over the colours: it starts at the half decade at or below their 10th
    percentile (never below 1e-4) and steps a quarter or half decade, so that a far quantization (Q2_K: most
    tokens above 0.1 nat) is not one saturated red."""
    v = sorted(x for x in values if x > 0 and math.isfinite(x))
    if not v:
        return KLD_SCALE
    start = max(KLD_SCALE.start, math.floor(math.log10(v[int(0.1 * (len(v) - 1))]) * 2) / 2)
    span = max(math.log10(v[-1]) - start, 1.0)
    return KldScale(start, min(0.5, max(0.25, math.ceil(span / 8 * 4) / 4)))


def kld_class(kld: float, scale: KldScale = KLD_SCALE) -> str:
    """k0 (below the scale's first edge) .. k9."""
    if not kld >= scale.edge(1):
        return "k0"
    # log10 of an edge can come out a hair below its exact value, so the bucket is the last edge not above kld,
    # compared in kld's own units
    i = min(9, 1 + int((math.log10(kld) - scale.start) / scale.step + 1e-9))
    return f"k{i if kld >= scale.edge(i) else i - 1}"


def fork_class(jump: float) -> str:
    """f0 (no move) .. f9 (the outcome distribution moves by >= 0.9 in total variation)."""
    return f"f{min(9, max(0, int(jump * 10)))}"


def fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        if v == 0:
            return "0"
        a = abs(v)
        return f"{v:.3e}" if a < 1e-3 or a >= 1e6 else f"{v:.4g}" if a < 1000 else f"{v:,.1f}"
    return str(v)


# -- HTML ------------------------------------------------------------------------------------------
_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1200px;padding:0 18px 60px;color:#1d1d1f}
h1{font-size:22px;margin:18px 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:3px}
h3{font-size:15px;margin:18px 0 6px}
table{border-collapse:collapse;margin:6px 0 10px;font-size:12.5px}
td,th{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f4f4f6;position:sticky;top:0;white-space:nowrap}th.w{white-space:normal}
th.s{cursor:pointer;user-select:none}th.s:after{content:" \\2195";color:#aaa}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}td.l{min-width:16em}td.t{white-space:nowrap}
.tw{overflow-x:auto;max-width:100%}.tw>table{margin:0}.tw{margin:6px 0 10px}
table.kv td:first-child{color:#555;white-space:nowrap}
.note{color:#555;font-size:13px}.warn{background:#fff4d6;border-left:4px solid #e0a800;padding:6px 10px}
.cap{color:#555;font-size:12.5px;margin:2px 0 14px}
.fig svg{max-width:100%;height:auto}
.ctx{font:13px/1.5 ui-monospace,Menlo,Consolas,monospace;background:#f6f6f8;padding:4px 8px;border-radius:4px;white-space:pre-wrap;word-break:break-all}
.strips{border:1px solid #e3e3e3;border-radius:6px;margin:6px 0 14px}
.row{display:flex;border-top:1px solid #eee}.row:first-child{border-top:none}
.lbl{flex:0 0 230px;padding:4px 8px;font-size:12px;color:#444;background:#fafafa;border-right:1px solid #eee;word-break:break-word}
.toks{flex:1;padding:4px 8px;font-size:15px;line-height:1.9;white-space:pre-wrap;overflow-wrap:anywhere}
body.ws .toks{font:13px/1.9 ui-monospace,Menlo,Consolas,monospace}
.tk{border-radius:3px;padding:1px 0;cursor:pointer}
.tk:focus,.tk:hover,.tk.pin{outline:2px solid #333}
#tip .bar{display:inline-block;height:8px;background:#5b7fd6;vertical-align:middle;border-radius:2px}
#tip td.sv{color:#2a7d2a}#tip td.cu{color:#999}
details.made{margin:30px 0 10px;border-top:1px solid #ddd;padding-top:6px}details.made>summary{font-size:18px;font-weight:600;cursor:pointer}
ul.find{margin:6px 0 12px;padding-left:22px}ul.find li{margin:3px 0}
.mk{display:inline-block;width:3px;height:1.25em;background:#d00;vertical-align:text-bottom;margin:0 2px}
#tip{position:absolute;z-index:10;background:#fff;border:1px solid #999;box-shadow:0 3px 10px rgba(0,0,0,.2);
 border-radius:5px;padding:6px 9px;font-size:12px;max-width:420px;pointer-events:none}
#tip table{margin:3px 0;font-size:12px}#tip td{border:none;padding:0 6px 0 0}#tip .tt{font:bold 13px ui-monospace,monospace}
#tip .at{color:#555;margin-top:4px}
.modes{margin:4px 0}.modes button{font-size:12px;margin-right:4px;padding:2px 8px;border:1px solid #bbb;background:#fff;border-radius:4px;cursor:pointer}
.legend{font-size:12px;color:#444;margin-left:10px}.legend span{padding:0 5px;margin-right:3px;border-radius:3px}
.legend{display:none}
table.grid td{padding:0;border:1px solid #fff}table.grid th.r{text-align:right;position:static;max-width:none}
table.grid .tk{display:block;width:74px;white-space:pre;padding:0 3px;border-radius:0;font:11px/1.9 ui-monospace,monospace}
table.grid th{font:11px ui-monospace,monospace;max-width:74px}table.grid .tk,table.grid th{overflow:hidden;text-overflow:ellipsis}
"""


def _mode_css(modes: list[str]) -> str:
    out = []
    for m in modes:
        out.append(f'body[data-mode="{m}"] .modes button[data-setmode="{m}"]{{background:#333;color:#fff}}')
        out.append(f'body[data-mode="{m}"] .legend.{m}{{display:inline}}')
    for i in range(10):  # probability: red (unsure) -> green (sure)
        c = f"hsl({i * 13},70%,{78 + (i in (4, 5, 6)) * 2}%)"
        out.append(f'body[data-mode="prob"] .p{i},.legend .p{i}{{background:{c}}}')
    for i, c in enumerate(["#b9efb0", "#fff2a0", "#ffb8b0", "#dcc7ff"]):  # GLTR
        out.append(f'body[data-mode="gltr"] .g{i},.legend .g{i}{{background:{c}}}')
    out.append('body[data-mode="same"] .st1,.legend .st1{background:#b9efb0}')
    out.append('body[data-mode="same"] .st0,.legend .st0{background:#ffb8b0}')
    # white -> deep: fork (how far the outcome distribution moves at the token) blue, entropy purple, KLD red
    for mode, cls, hue in (("fork", "f", 220), ("entropy", "e", 275), ("kld", "k", 0)):
        for i in range(10):
            c = f"hsl({hue},{20 + i * 8}%,{98 - i * 5.5:.0f}%)"
            out.append(f'body[data-mode="{mode}"] .{cls}{i},.legend .{cls}{i}{{background:{c}}}')
    return "\n".join(out)


_LEGENDS = {
    "prob": "".join(f'<span class="p{i}">{i / 10:.1f}</span>' for i in range(10)) + " probability of the token",
    "gltr": '<span class="g0">top 10</span><span class="g1">top 100</span><span class="g2">top 1000</span>'
            '<span class="g3">beyond</span> rank of the token (GLTR)',
    "same": '<span class="st1">same</span><span class="st0">different</span> top token under the two models',
    "entropy": "".join(f'<span class="e{i}">{i}{"+" if i == 9 else ""}</span>' for i in range(10)) + " entropy (nats)",
    "fork": "".join(f'<span class="f{i}">{i / 10:.1f}</span>' for i in range(10))
            + " how far the outcome distribution moves at the token (total variation)",
}

def _legend(mode: str, doc: Document) -> str:
    """A colour mode's legend (markup made here from numbers; the KLD one from the document's scale)."""
    if mode != "kld":
        return _LEGENDS.get(mode, "")
    scale = doc.kld_scale or KLD_SCALE
    return "".join(f'<span class="k{i}">{f"&lt;{scale.edge(1):.2g}" if i == 0 else f"{scale.edge(i):.2g}"}</span>'
                   for i in range(10)) + " KL divergence (nats)"


_JS = r"""
(function(){
const D=JSON.parse(document.getElementById('ll-data').textContent);
const tip=document.getElementById('tip');
function el(tag,cls,text){const e=document.createElement(tag);if(cls)e.className=cls;if(text!==undefined)e.textContent=text;return e;}
function show(t){
  const d=D.tokens[+t.dataset.i];if(!d)return;
  tip.replaceChildren();
  tip.appendChild(el('div','tt',d[0]));
  const tb=el('table');
  const r0=el('tr');r0.appendChild(el('td','','id'));r0.appendChild(el('td','',String(d[1])));tb.appendChild(r0);
  D.fields.forEach((f,i)=>{const r=el('tr');r.appendChild(el('td','',f));r.appendChild(el('td','',d[2][i]));tb.appendChild(r);});
  tip.appendChild(tb);
  (d[3]||[]).forEach((alts,j)=>{
    tip.appendChild(el('div','at',D.alt_titles[j]||'alternatives'));
    const at=el('table');
    alts.forEach(a=>{const r=el('tr');r.appendChild(el('td','',a[0]));r.appendChild(el('td','',a[1]));
      const p=parseFloat(a[1]);const bc=el('td');
      if(p>=0&&p<=1){const bar=el('span','bar');bar.style.width=Math.max(1,Math.round(p*80))+'px';bc.appendChild(bar);}
      r.appendChild(bc);if(a[2])r.appendChild(el('td',a[2][0]==='\u2713'?'sv':'cu',a[2]));at.appendChild(r);});
    tip.appendChild(at);
  });
  tip.hidden=false;
  const b=t.getBoundingClientRect();
  let x=window.scrollX+b.left, y=window.scrollY+b.bottom+4;
  const w=tip.offsetWidth;
  if(x+w>window.scrollX+document.documentElement.clientWidth-8)x=window.scrollX+document.documentElement.clientWidth-w-8;
  tip.style.left=Math.max(0,x)+'px';tip.style.top=y+'px';
}
let pinned=null;
function hide(){if(pinned)show(pinned);else tip.hidden=true;}
function tk(e){return e.target.closest&&e.target.closest('.tk');}
document.addEventListener('mouseover',e=>{const t=tk(e);if(t)show(t);});
document.addEventListener('mouseout',e=>{if(tk(e))hide();});
document.addEventListener('focusin',e=>{const t=tk(e);if(t)show(t);else hide();});
document.addEventListener('focusout',hide);
// a click pins a token's pop-up (it stays while the mouse moves on); a click on it again or elsewhere unpins
document.addEventListener('click',e=>{const t=tk(e);if(pinned)pinned.classList.remove('pin');
  if(t&&t!==pinned){pinned=t;t.classList.add('pin');show(t);}else{pinned=null;tip.hidden=true;}});
// "show whitespace": each token as its visible form (· for an edge space) in monospace, or back to prose
document.querySelectorAll('[data-ws]').forEach(b=>b.addEventListener('click',()=>{
  const on=document.body.classList.toggle('ws');b.textContent=on?'hide whitespace':'show whitespace';
  document.querySelectorAll('.tk').forEach(t=>{const d=D.tokens[+t.dataset.i];if(d)t.textContent=on?d[0]:d[4];});}));
document.querySelectorAll('[data-setmode]').forEach(b=>b.addEventListener('click',()=>{document.body.dataset.mode=b.dataset.setmode;}));
document.querySelectorAll('table.sortable').forEach(tbl=>{
  tbl.querySelectorAll('th').forEach((th,ci)=>{th.classList.add('s');th.addEventListener('click',()=>{
    const body=tbl.tBodies[0];const rows=Array.from(body.rows);const asc=th.dataset.dir!=='asc';th.dataset.dir=asc?'asc':'desc';
    const key=r=>{const c=r.cells[ci];const v=c.dataset.v;return v!==undefined&&v!==''?parseFloat(v):c.textContent;};
    rows.sort((a,b)=>{const x=key(a),y=key(b);const c=(typeof x==='number'&&typeof y==='number')?x-y:String(x).localeCompare(String(y));return asc?c:-c;});
    rows.forEach(r=>body.appendChild(r));});});
});
})();
"""


# what json.dumps leaves raw that a terminal acts on (it \u-escapes C0 itself): DEL, C1, the bidi overrides
_TERMINAL_ACTIVE = re.compile("[\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _e(s) -> str:
    """Text for HTML: terminal-active characters made visible (terminal_safe), then HTML-escaped."""
    return html.escape(terminal_safe(str(s)), quote=True)


def _json_for_script(obj) -> str:
    """JSON safe inside <script>: no '<', '>' or '&' can close the element or start markup."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    text = _TERMINAL_ACTIVE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)  # DEL, C1, bidi: escaped, same value
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _cell(v) -> str:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        num = "" if isinstance(v, float) and not math.isfinite(v) else repr(v)
        return f'<td class="n" data-v="{num}">{_e(fmt(v))}</td>'
    # long text gets room and wraps; a short one stays on its line (a wide table scrolls in its box instead)
    return f'<td class="l">{_e(v)}</td>' if len(str(v)) > 60 else f'<td class="t">{_e(v)}</td>'


def _strips_html(b: Strips, doc: Document, tokens: list) -> list[str]:
    """A strip block: its colour-mode buttons, the context, one row of token spans per sample (or, with columns, a
    grid: a table row per label, a cell per column)."""
    body: list[str] = [f"<h3>{_e(b.title)}</h3>", '<div class="modes">colour by: ' + "".join(
        f'<button type="button" data-setmode="{_e(m)}">{_e(label)}</button>' for m, label in doc.modes)
        + ("" if b.columns else ' <button type="button" data-ws="1">show whitespace</button>')
        + "".join(f'<span class="legend {m}">{_legend(m, doc)}</span>' for m, _ in doc.modes) + "</div>"]
    if b.columns:
        head = "<th></th>" + "".join(f'<th title="{_e(c)}">{_e(c)}</th>' for c in b.columns)
        rows = "".join(f'<tr><th class="r">{_e(label)}</th>' + "".join(f"<td>{_token_span(t, tokens)}</td>" for t in cells)
                       + "</tr>" for label, cells in b.rows)
        return body + [f'<table class="grid"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>']
    if b.context:
        body.append(f'<div class="ctx">{_e(b.context)}</div>')
    rows = []
    for label, toks in b.rows:
        spans = []
        for t in toks:
            if t.mark:
                spans.append(f'<span class="mk" title="{_e(t.mark)}"></span>')
            spans.append(_token_span(t, tokens))
            if t.newline:
                spans.append("<br>")
        rows.append(f'<div class="row"><div class="lbl">{_e(label)}</div><div class="toks">{"".join(spans)}</div></div>')
    body.append(f'<div class="strips">{"".join(rows)}</div>')
    return body


def _token_span(t: TokenView, tokens: list) -> str:
    """A token's span; its tooltip data appended to `tokens` (the page's JSON block)."""
    shown = t.text if t.plain is None else t.plain
    tokens.append([t.text, t.id, t.values, [[list(a) for a in alts] for alts in t.alts], shown])
    return f'<span class="tk {t.classes}" data-i="{len(tokens) - 1}" tabindex="0">{_e(shown)}</span>'


def _html_blocks(blocks: list, doc: Document, tokens: list) -> list[str]:
    """The blocks' markup; each strip token's tooltip data is appended to `tokens` (the page's JSON block)."""
    from llamalens.reports import plots

    body: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{_e(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            body.append(f'<p class="{_e(b.kind)}">{_e(b.text)}</p>')
        elif isinstance(b, KeyValues):
            body.append('<table class="kv">' + "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in b.rows)
                        + "</table>")
        elif isinstance(b, Table):
            # a long header (a chain's label) may wrap, so that a wide table fits the page
            head = "".join(f'<th class="w">{_e(h)}</th>' if len(str(h)) > 12 else f"<th>{_e(h)}</th>" for h in b.header)
            rows = "".join("<tr>" + "".join(_cell(v) for v in r) + "</tr>" for r in b.rows)
            cls = ' class="sortable"' if b.sortable else ""
            body.append(f'<div class="tw"><table{cls}><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>')
            if b.caption or b.sortable:
                sort_hint = " Click a column to sort." if b.sortable else ""
                body.append(f'<p class="cap">{_e(b.caption)}{sort_hint}</p>')
        elif isinstance(b, Figure):
            body.append(f'<div class="fig">{plots.svg(b.fig)}</div>')
            if b.caption:
                body.append(f'<p class="cap">{_e(b.caption)}</p>')
        elif isinstance(b, Strips):
            body += _strips_html(b, doc, tokens)
        elif isinstance(b, Bullets):
            body.append('<ul class="find">' + "".join(f"<li>{_e(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Folded):
            body.append(f'<details class="made"><summary>{_e(b.summary)}</summary>'
                        + "\n".join(_html_blocks(b.blocks, doc, tokens)) + "</details>")
        else:  # pragma: no cover - a builder bug
            raise TypeError(f"unknown block {type(b).__name__}")
    return body


def to_html(doc: Document) -> str:
    tokens: list = []
    mode_names = [m for m, _ in doc.modes]
    body: list[str] = [f"<h1>{_e(doc.title)}</h1>", *_html_blocks(doc.blocks, doc, tokens)]
    data = {"fields": doc.fields, "alt_titles": doc.alt_titles, "tokens": tokens}
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
            "script-src 'unsafe-inline'; img-src data:\">"
            f"<title>{_e(doc.title)}</title><style>{_CSS}{_mode_css(mode_names)}</style></head>"
            f"<body data-mode=\"{_e(mode_names[0] if mode_names else '')}\">"
            + "\n".join(body)
            + '<div id="tip" hidden></div>'
            f'<script type="application/json" id="ll-data">{_json_for_script(data)}</script>'
            f"<script>{_JS}</script></body></html>\n")


# -- Markdown --------------------------------------------------------------------------------------
def _md(s) -> str:
    """Text safe in a Markdown table cell or paragraph: no HTML, no pipes, no line breaks."""
    s = html.escape(terminal_safe(str(s)), quote=False).replace("|", "\\|").replace("\n", " ")
    return re.sub(r"([\\`*_\[\]#])", r"\\\1", s) if s.strip() else s


def _fence(text: str) -> str:
    n = max([3] + [len(m) + 1 for m in re.findall(r"`+", text)])
    return "`" * n


def to_markdown(doc: Document, image_dir: Path, image_prefix: str, replaceable: frozenset[str] = frozenset(),
                written: list[str] | None = None) -> str:
    """The Markdown text; each figure written as a PNG into image_dir (its name added to `written`), never over
    a file there that is not in `replaceable` (the images an earlier report wrote there): such a name is taken
    with a "_" added."""
    out = [f"# {_md(doc.title)}", ""] + _md_blocks(doc.blocks, doc, image_dir, image_prefix, set(), replaceable, written)
    # code blocks hold texts as they are: the whole page, too, shows no character a terminal acts on
    return terminal_safe("\n".join(out) + "\n")


def _md_blocks(blocks: list, doc: Document, image_dir: Path, image_prefix: str, used: set[str],
               replaceable: frozenset[str], written: list[str] | None) -> list[str]:
    """The blocks as Markdown lines; each figure written as a PNG under image_dir (names in `used` taken)."""
    from llamalens.reports import plots

    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out += ["#" * b.level + " " + _md(b.text), ""]
        elif isinstance(b, Para):
            out += [("> " if b.kind == "warn" else "") + _md(b.text), ""]
        elif isinstance(b, Bullets):
            out += [f"- {_md(i)}" for i in b.items] + [""]
        elif isinstance(b, Folded):
            out += [f"## {_md(b.summary)}", ""] + _md_blocks(b.blocks, doc, image_dir, image_prefix, used, replaceable, written)
        elif isinstance(b, KeyValues):
            out += ["| | |", "|---|---|"] + [f"| {_md(k)} | {_md(v)} |" for k, v in b.rows] + [""]
        elif isinstance(b, Table):
            out.append("| " + " | ".join(_md(h) for h in b.header) + " |")
            out.append("|" + "|".join("---:" if r and isinstance(r, (int, float)) else "---"
                                      for r in (b.rows[0] if b.rows else [""] * len(b.header))) + "|")
            out += ["| " + " | ".join(_md(fmt(v)) for v in r) + " |" for r in b.rows]
            out += [""] + ([f"*{_md(b.caption)}*", ""] if b.caption else [])
        elif isinstance(b, Figure):
            name = re.sub(r"[^A-Za-z0-9_.-]", "_", b.name)
            while name in used or (f"{name}.png" not in replaceable and os.path.lexists(image_dir / f"{name}.png")):
                name += "_"
            used.add(name)
            (image_dir / f"{name}.png").write_bytes(plots.png(b.fig))
            if written is not None:
                written.append(f"{name}.png")
            out += [f"![{_md(b.caption or name)}]({image_prefix}/{name}.png)", ""]
            if b.caption:
                out += [f"*{_md(b.caption)}*", ""]
        elif isinstance(b, Strips) and b.columns:
            out += [f"### {_md(b.title)}", "", "| | " + " | ".join(_md(c) for c in b.columns) + " |",
                    "|---|" + "---|" * len(b.columns), *("| " + " | ".join([_md(label)] + [
                        f"{_md(t.text)} {t.values[0]}" for t in cells]) + " |" for label, cells in b.rows), ""]
        elif isinstance(b, Strips):
            out += [f"### {_md(b.title)}", ""]
            if b.context:
                out += [_fence(b.context) + "text", b.context, _fence(b.context), ""]
            for label, toks in b.rows:
                text = "".join((t.text if t.plain is None else t.plain) + ("\n" if t.newline else "") for t in toks)
                fence = _fence(text)
                out += [f"**{_md(label)}**", "", fence + "text", text, fence]
                top = sorted(toks, key=lambda t: -t.notable)[:5]
                if top and doc.fields:
                    out.append("most notable: " + "; ".join(
                        f"`{t.text.replace('`', 'ˋ')}` " + ", ".join(f"{f} {v}" for f, v in zip(doc.fields[:3], t.values[:3]))
                        for t in top if t.notable > 0))
                out.append("")
    return out


# -- writing ---------------------------------------------------------------------------------------
def report_format(path: str | os.PathLike, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise InvalidInput(f"unknown report format {fmt!r}; use one of: {', '.join(FORMATS)}")
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix in (".html", ".htm"):
        return "html"
    if suffix in (".md", ".markdown"):
        return "md"
    raise InvalidInput(f"cannot tell the report format from {str(path)!r}; name it .html or .md, or pass --format html|md")


def check_writable(path: str | os.PathLike) -> Path:
    """Fail before any work if the report cannot be written there (or would overwrite a run store)."""
    from llamalens.store import check_not_a_store

    p = Path(path)
    check_not_a_store(p)
    if p.is_dir():
        raise InvalidInput(f"report path {p} is a directory; give a file name such as {p / 'report.html'}")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise InvalidInput(f"cannot write the report to {p}: folder {parent} does not exist; create it or choose another path")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise InvalidInput(f"cannot write the report to {p}: permission denied; choose a writable path")
    return p


IMAGES_WRITTEN = ".llamalens-images"  # in FILE_files/: the names of the images llamalens wrote there, one a line


def _images_written(image_dir: Path) -> frozenset[str]:
    """The images an earlier Markdown report wrote into image_dir (its IMAGES_WRITTEN list): the only files
    there a new report may replace or remove. Anything else in the folder (a browser's "save page, complete"
    files, the user's own) is left alone."""
    try:
        names = (image_dir / IMAGES_WRITTEN).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return frozenset()
    return frozenset(n for n in names if re.fullmatch(r"[A-Za-z0-9_.-]+\.png", n) and not n.startswith("."))


def _write_markdown(doc: Document, out: Path, tmp: Path) -> list[Path]:
    image_dir = out.with_name(out.stem + "_files")
    image_dir.mkdir(exist_ok=True)
    ours = _images_written(image_dir)
    for name in ours:
        (image_dir / name).unlink(missing_ok=True)
    names: list[str] = []
    try:
        tmp.write_text(to_markdown(doc, image_dir, image_dir.name, ours, names), encoding="utf-8")
    finally:  # whatever was written is listed, so that the next report may replace it
        (image_dir / IMAGES_WRITTEN).write_text("".join(n + "\n" for n in names), encoding="utf-8")
    return [image_dir / n for n in names]


def write(doc: Document, path: str | os.PathLike, fmt: str | None = None) -> list[Path]:
    """Write the document; return the files written. Written to a temporary name, then renamed; a Markdown
    report's images replace only those an earlier report wrote (_images_written)."""
    out = check_writable(path)
    kind = report_format(out, fmt)
    tmp = out.with_name(out.name + ".part")
    while os.path.lexists(tmp):  # someone else's file: not ours to overwrite or remove
        tmp = tmp.with_name(tmp.name + "_")
    written = [out]
    try:
        if kind == "html":
            tmp.write_text(to_html(doc), encoding="utf-8")
        else:
            written += _write_markdown(doc, out, tmp)
        tmp.replace(out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise LlamalensError(f"cannot write the report to {out} ({e.strerror}); choose a writable path") from None
    return written

