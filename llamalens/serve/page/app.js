/* llamalens serve: the page. Plain ES2020, no framework, no build step, no external request.
   Every text from the server (tokens, prompts, names, model output) goes into the DOM through textContent,
   never innerHTML: a model can write <script>. Styles are set through classes or element.style (CSP-safe). */
'use strict';
(() => {
  const $ = (id) => document.getElementById(id);

  // ---------------------------------------------------------------------------------------------- helpers
  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === 'class') e.className = v;
      else if (k === 'text') e.textContent = v;
      else if (k === 'data') for (const [dk, dv] of Object.entries(v)) e.dataset[dk] = String(dv);
      else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
      else if (k === 'style') throw new Error('no style attribute (CSP)');
      else e.setAttribute(k, v === true ? '' : String(v));
    }
    for (const kid of kids.flat()) {
      if (kid === undefined || kid === null || kid === false) continue;
      e.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
    }
    return e;
  }

  const BIDI = /[\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]/;
  /** A token's text with its invisible characters made visible (the pop-up and labels; the flowing text keeps them). */
  function visible(s) {
    if (s === undefined || s === null) return '';
    if (s === '') return '∅';
    let out = '';
    for (const ch of s) {
      const c = ch.codePointAt(0);
      if (ch === '\n') out += '↵';
      else if (ch === '\t') out += '⇥';
      else if (ch === '\r') out += '␍';
      else if (ch === ' ') out += '·';
      else if (c < 0x20 || (c >= 0x7f && c < 0xa0)) out += '\\x' + c.toString(16).padStart(2, '0');
      else if (BIDI.test(ch)) out += '\\u' + c.toString(16).padStart(4, '0');
      else out += ch;
    }
    return out;
  }
  /** One line of text for buttons and titles: newlines and controls shown, shortened. */
  function snippet(s, n) {
    const v = visible(s || '').replace(/·/g, ' ');
    return v.length > n ? v.slice(0, n - 1) + '…' : v;
  }
  const probOf = (r) => (typeof r.prob === 'number' ? r.prob : Math.exp(r.logprob));
  function pct(p) {
    if (typeof p !== 'number' || !isFinite(p)) return '—';
    if (p === 0) return '0%';
    if (p < 0.0001) return (p * 100).toExponential(1) + '%';
    if (p < 0.01) return (p * 100).toFixed(3) + '%';
    return (p * 100).toFixed(1) + '%';
  }
  const num = (x, d = 3) => (typeof x === 'number' && isFinite(x) ? x.toFixed(d) : (x === -Infinity ? '−∞' : '—'));
  const probClass = (p) => 'p' + Math.max(0, Math.min(9, Math.floor(p * 10)));
  const rankClass = (r) => (r <= 1 ? 'r0' : r <= 10 ? 'r1' : r <= 100 ? 'r2' : 'r3');
  const keyOf = (id) => String(id);

  async function errorText(res) {
    let msg = '';
    try {
      const t = await res.text();
      try {
        const j = JSON.parse(t);
        msg = (j.error && j.error.message) || j.error || j.message || j.detail || t;
        if (typeof msg !== 'string') msg = JSON.stringify(msg);
      } catch (_) { msg = t; }
    } catch (_) { /* no body */ }
    return `${res.status} ${res.statusText}${msg ? ': ' + msg.slice(0, 500) : ''}`;
  }

  async function api(path, body, signal) {
    const opt = { credentials: 'same-origin', headers: {}, signal };
    if (body !== undefined) {
      opt.method = 'POST';
      opt.headers['Content-Type'] = 'application/json';
      opt.body = JSON.stringify(body);
    }
    const res = await fetch(path, opt);
    if (!res.ok) throw new Error(await errorText(res));
    return res.json();
  }

  // ------------------------------------------------------------------------------------------------ state
  const S = {
    info: null,
    defaults: {},
    cppOnly: new Set(), // fields only the llama.cpp chain has
    tree: null, // the tree the branches belong to (null: a stored run of another kind, read only until adopted)
    run: null, // that stored run's id
    treeName: '',
    branchable: true,
    branches: new Map(), // key -> branch {branch, parent, at, forced, prompt, prompt_tokens, tokens, text, ...}
    current: null, // key of the branch in the token view
    items: [], // the token view's items: {rec, owner, pos, pre, forced}
    sel: null, // the selected item
    colour: 'prob',
    busy: false,
    compare: [], // keys ticked for comparison (at most two)
    posSeq: 0,
    posAbort: null,
    posTimer: 0,
  };

  function setStatus(state, text) {
    const s = $('status');
    s.dataset.state = state;
    s.textContent = text;
  }
  function setBusy(b) {
    S.busy = b;
    $('generate').disabled = b;
    $('cancel').disabled = !b;
    for (const x of document.querySelectorAll('.branch-btn, #continue-go')) x.disabled = b || !S.branchable;
  }

  // ------------------------------------------------------------------------------------------- settings
  const BASIC = ['temperature', 'top_k', 'top_p', 'min_p', 'repeat_penalty', 'seed'];
  const SLIDERS = { temperature: [0, 2, 0.01], top_k: [0, 100, 1], top_p: [0, 1, 0.01], min_p: [0, 1, 0.01], repeat_penalty: [0.5, 2, 0.01] };
  const ENUMS = { chain: ['llama-cpp-python', 'llama.cpp'], strategy: ['sample', 'greedy', 'beam'],
    early_stopping: ['false', 'true', 'never'], best_of_by: ['sum', 'mean'] };

  function settingInput(name, value) {
    const id = 's-' + name;
    const label = el('label', { for: id, text: name.replace(/_/g, ' '), title: name });
    let input;
    let extra = null;
    if (typeof value === 'boolean') {
      input = el('input', { id, type: 'checkbox', data: { key: name, kind: 'bool' } });
      input.checked = value;
    } else if (typeof value === 'number') {
      input = el('input', { id, type: 'number', step: 'any', data: { key: name, kind: 'num' } });
      input.value = String(value);
      if (SLIDERS[name]) {
        const [lo, hi, step] = SLIDERS[name];
        extra = el('input', { type: 'range', min: lo, max: hi, step, 'aria-label': name + ' slider', class: 'slider', data: { for: id } });
        extra.value = String(value);
        extra.addEventListener('input', () => { input.value = extra.value; settingsChanged(); });
        input.addEventListener('input', () => { extra.value = input.value; });
      }
    } else if (typeof value === 'string' && ENUMS[name]) {
      input = el('select', { id, data: { key: name, kind: 'str' } }, ENUMS[name].map((v) => el('option', { value: v, text: v })));
      if (!ENUMS[name].includes(value)) input.append(el('option', { value, text: value }));
      input.value = value;
    } else if (typeof value === 'string') {
      input = el('input', { id, type: 'text', spellcheck: 'false', data: { key: name, kind: 'str' } });
      input.value = value;
    } else {
      input = el('input', { id, type: 'text', spellcheck: 'false', data: { key: name, kind: 'json' }, title: 'JSON' });
      input.value = JSON.stringify(value);
    }
    input.addEventListener('input', () => { $('preset').value = '__custom'; settingsChanged(); });
    input.addEventListener('change', () => { $('preset').value = '__custom'; settingsChanged(); });
    const cell = el('div', { class: 'cell' }, input, extra);
    return [label, cell];
  }

  function buildSettings(defaults, presets) {
    const basic = $('basic-settings');
    const adv = $('advanced-settings');
    basic.replaceChildren();
    adv.replaceChildren();
    for (const name of BASIC) if (name in defaults) basic.append(...settingInput(name, defaults[name]));
    for (const [name, v] of Object.entries(defaults)) if (!BASIC.includes(name)) adv.append(...settingInput(name, v));
    const sel = $('preset');
    sel.replaceChildren(el('option', { value: '', text: 'defaults' }));
    for (const name of Object.keys(presets || {})) sel.append(el('option', { value: name, text: name }));
    sel.append(el('option', { value: '__custom', text: 'custom', hidden: true }));
  }

  function setControl(name, value) {
    const input = $('s-' + name);
    if (!input) return;
    const kind = input.dataset.kind;
    if (kind === 'bool') input.checked = !!value;
    else if (kind === 'json') input.value = JSON.stringify(value);
    else {
      if (input.tagName === 'SELECT' && ![...input.options].some((o) => o.value === String(value))) input.append(el('option', { value: String(value), text: String(value) }));
      input.value = String(value);
    }
    const slider = document.querySelector(`input.slider[data-for="s-${name}"]`);
    if (slider) slider.value = String(value);
  }

  function applyPreset(name) {
    const preset = (S.info && S.info.presets && S.info.presets[name]) || {};
    for (const [k, v] of Object.entries(S.defaults)) setControl(k, v);
    for (const [k, v] of Object.entries(preset)) setControl(k, v);
    settingsChanged();
  }

  /** The settings the controls say, or throws an Error naming the bad field. */
  function readSettings() {
    const out = {};
    for (const input of document.querySelectorAll('#controls [data-key]')) {
      const name = input.dataset.key;
      const kind = input.dataset.kind;
      if (kind === 'bool') out[name] = input.checked;
      else if (kind === 'num') {
        if (input.value.trim() === '' || !isFinite(Number(input.value))) throw new Error(`${name}: a number, please`);
        out[name] = Number(input.value);
      } else if (kind === 'json') {
        try { out[name] = JSON.parse(input.value); } catch (_) { throw new Error(`${name}: not valid JSON (e.g. ${JSON.stringify(S.defaults[name])})`); }
      } else out[name] = input.value;
    }
    if (out.chain !== 'llama.cpp') {
      for (const k of S.cppOnly) if (JSON.stringify(out[k]) === JSON.stringify(S.defaults[k])) delete out[k];
    }
    return out;
  }
  function readInt(id, lo, hi) {
    const v = Math.round(Number($(id).value));
    if (!isFinite(v)) throw new Error(`${id}: a number, please`);
    return Math.max(lo, Math.min(hi, v));
  }

  function settingsChanged() {
    const err = $('settings-error');
    try {
      readSettings();
      err.hidden = true;
    } catch (e) {
      err.hidden = false;
      err.textContent = e.message;
      return;
    }
    if (S.sel) {
      clearTimeout(S.posTimer);
      S.posTimer = setTimeout(requestPosition, 50);
    }
  }

  // ------------------------------------------------------------------------------------------- branches
  function normBranch(b) {
    return {
      branch: b.branch,
      parent: b.parent === undefined ? null : b.parent,
      at: b.at || 0,
      forced: b.forced || [],
      own_from: b.own_from,
      status: b.status,
      prompt: b.prompt,
      prompt_tokens: b.prompt_tokens || [],
      tokens: b.tokens || [],
      text: b.text || '',
      finish_reason: b.finish_reason || null,
      settings: b.settings || null,
      sequence_logprob: b.sequence_logprob,
      mean_logprob: b.mean_logprob,
    };
  }

  /** A branch's whole sequence, as the view shows it: the parent's first `at` tokens (greyed), the forced
      tokens (marked), then its own. The server's tree format already holds the whole path (`own_from` says where
      its own tokens start); a branch being streamed is put together from its parent's sequence. Positions are
      indices in that sequence. */
  function fullTokens(key, depth = 0) {
    const b = S.branches.get(key);
    if (!b) return [];
    const child = b.parent !== null;
    if (b.own_from !== null && b.own_from !== undefined) {
      return b.tokens.map((rec, i) => ({ rec, owner: key, pos: i, pre: child && i < b.at, forced: child && i >= b.at && i < b.own_from }));
    }
    let prefix = [];
    if (child && S.branches.has(keyOf(b.parent)) && depth < 256) {
      prefix = fullTokens(keyOf(b.parent), depth + 1).slice(0, b.at).map((x) => ({ ...x, pre: true, forced: false }));
    }
    const forced = (b.forced || []).map((rec) => ({ rec, owner: key, pre: false, forced: child }));
    const own = b.tokens.map((rec) => ({ rec, owner: key, pre: false, forced: false }));
    return prefix.concat(forced, own).map((x, i) => ({ ...x, pos: i }));
  }

  function promptText(b) {
    if (typeof b.prompt === 'string') return b.prompt;
    if (b.prompt && typeof b.prompt === 'object') return JSON.stringify(b.prompt);
    return (b.prompt_tokens || []).map((t) => t.text).join('');
  }

  function meanLogprob(key) {
    const b = S.branches.get(key);
    if (typeof b.mean_logprob === 'number') return b.mean_logprob;
    const lps = fullTokens(key).map((x) => x.rec.logprob).filter((x) => typeof x === 'number');
    return lps.length ? lps.reduce((a, x) => a + x, 0) / lps.length : NaN;
  }
  function branchLabel(b) {
    return `#${b.branch}`;
  }

  // ------------------------------------------------------------------------------------------ token view
  function tokenSpan(item, i) {
    const r = item.rec;
    const p = typeof r.prob === 'number' ? r.prob : (typeof r.logprob === 'number' ? Math.exp(r.logprob) : 0);
    const cls = ['tk', probClass(p), rankClass(r.rank || 1)];
    if (item.pre) cls.push('pre');
    if (item.forced) cls.push('forced');
    if (r.eog) cls.push('eog');
    if (/^\s+$/.test(r.text || '') && /\n/.test(r.text)) cls.push('nl');
    const label = `token ${visible(r.text)}${r.eog ? ' (end of generation)' : ''}, probability ${pct(p)}, rank ${r.rank ?? '?'}, position ${item.pos}`;
    return el('span', { class: cls.join(' '), tabindex: '-1', role: 'button', 'aria-label': label, data: { i, pos: item.pos, id: r.id } },
      r.eog ? '' : (r.text || ''));
  }

  function renderView() {
    const box = $('tokens');
    box.replaceChildren();
    const b = S.branches.get(S.current);
    if (!b) {
      box.append(el('p', { class: 'hint', text: 'Type a prompt and press Generate. Click any token to see what else the model weighed.' }));
      $('view-title').textContent = 'Text';
      S.items = [];
      return;
    }
    $('view-title').textContent = `Branch ${branchLabel(b)}` + (b.parent !== null ? ` (from #${b.parent} at position ${b.at})` : '');
    box.append(el('span', { class: 'prompt', title: 'the prompt' }, promptText(b)));
    S.items = fullTokens(S.current);
    const frag = document.createDocumentFragment();
    S.items.forEach((item, i) => frag.append(tokenSpan(item, i)));
    box.append(frag);
    const first = box.querySelector('.tk');
    if (first) first.tabIndex = 0;
    if (S.sel) { // keep the selection when it is still in view
      const j = S.items.findIndex((x) => x.owner === S.sel.owner && x.pos === S.sel.pos);
      if (j >= 0) markSelected(j, false);
    }
  }

  function appendToken(key) {
    if (S.current !== key) return;
    const items = fullTokens(key);
    const box = $('tokens');
    // new items past those shown (a forced token may show first as its own record)
    const shown = box.querySelectorAll('.tk').length;
    if (items.length < shown) { renderView(); return; }
    for (let i = shown; i < items.length; i++) {
      const span = tokenSpan(items[i], i);
      if (i === 0) span.tabIndex = 0;
      box.append(span);
    }
    S.items = items;
  }

  function markSelected(i, focus) {
    const spans = $('tokens').querySelectorAll('.tk');
    for (const s of $('tokens').querySelectorAll('.tk.sel')) { s.classList.remove('sel'); s.removeAttribute('aria-current'); }
    const span = spans[i];
    if (!span) return;
    span.classList.add('sel');
    span.setAttribute('aria-current', 'true');
    for (const s of spans) s.tabIndex = -1;
    span.tabIndex = 0;
    if (focus) span.focus();
  }

  function selectToken(i) {
    const item = S.items[i];
    if (!item) return;
    S.sel = item;
    markSelected(i, true);
    renderPosition();
    requestPosition();
  }

  function onTokensKey(ev) {
    const span = ev.target.closest && ev.target.closest('.tk');
    if (!span) return;
    const spans = [...$('tokens').querySelectorAll('.tk')];
    const i = spans.indexOf(span);
    let j = null;
    if (ev.key === 'ArrowRight' || ev.key === 'ArrowDown') j = Math.min(spans.length - 1, i + 1);
    else if (ev.key === 'ArrowLeft' || ev.key === 'ArrowUp') j = Math.max(0, i - 1);
    else if (ev.key === 'Home') j = 0;
    else if (ev.key === 'End') j = spans.length - 1;
    else if (ev.key === 'Enter' || ev.key === ' ') { ev.preventDefault(); selectToken(i); return; }
    if (j !== null) {
      ev.preventDefault();
      for (const s of spans) s.tabIndex = -1;
      spans[j].tabIndex = 0;
      spans[j].focus();
    }
  }

  // -------------------------------------------------------------------------------------- position panel
  function renderPosition() {
    const pane = $('pos');
    pane.replaceChildren();
    const item = S.sel;
    if (!item) { pane.append(el('p', { class: 'hint', text: 'No token selected.' })); return; }
    const r = item.rec;
    const owner = S.branches.get(item.owner);
    const p = typeof r.prob === 'number' ? r.prob : Math.exp(r.logprob);
    pane.append(el('h2', {}, `Position ${item.pos} `, el('span', { class: 'muted', text: `branch #${owner ? owner.branch : '?'}` })));
    pane.append(el('p', { class: 'chosen-token' }, el('code', { class: 'tokentext', text: visible(r.text) }),
      r.eog ? el('span', { class: 'muted', text: ' end of generation' }) : null,
      item.forced ? el('span', { class: 'badge', text: 'forced' }) : null));
    const stats = el('dl', { class: 'stats' });
    const stat = (k, v, title) => stats.append(el('dt', { text: k, title }), el('dd', { text: v }));
    stat('probability', pct(p));
    stat('logprob', num(r.logprob));
    stat('rank', String(r.rank ?? '—'));
    if (r.entropy !== undefined) stat('entropy', num(r.entropy) + ' nats', 'of the whole raw distribution');
    if (r.candidates !== undefined) stat('candidates', String(r.candidates), 'tokens left after the truncating samplers');
    if (r.sampled_logprob !== undefined) stat('sampled logprob', num(r.sampled_logprob), 'in the distribution sampled from');
    stat('token id', String(r.id));
    pane.append(stats);

    const top = r.top || [];
    if (!top.length) {
      pane.append(el('p', { class: 'note', text: 'No alternatives recorded at this position.' }));
    } else {
      const maxP = Math.max(...top.map(probOf), 1e-12);
      const table = el('table', { class: 'alts', id: 'alts' },
        el('caption', { class: 'muted', text: `Top ${top.length} raw alternatives, and after the sampler chain` }),
        el('thead', {}, el('tr', {},
          el('th', { scope: 'col', text: 'rank' }), el('th', { scope: 'col', text: 'token' }),
          el('th', { scope: 'col', text: 'raw p' }), el('th', { scope: 'col', text: 'logprob' }),
          el('th', { scope: 'col', text: 'after chain', title: 'probability after the sampler chain, or the stage that removed the token' }),
          el('th', { scope: 'col' }, el('span', { class: 'sr', text: 'branch' })))));
      const body = el('tbody');
      top.forEach((a, j) => {
        const ap = probOf(a);
        const bar = el('span', { class: 'bar raw' });
        bar.style.width = (100 * ap / maxP).toFixed(1) + '%';
        const post = el('span', { class: 'bar post' });
        post.style.width = '0%';
        const btn = el('button', { type: 'button', class: 'branch-btn small', title: `Branch here with ${visible(a.text)}`,
          'aria-label': `branch with ${visible(a.text)}`, data: { id: a.id } }, 'branch');
        btn.disabled = S.busy || !S.branchable;
        btn.addEventListener('click', () => branchFrom({ token: a.id }));
        body.append(el('tr', { class: 'alt' + (a.id === r.id ? ' chosen' : ''), data: { id: a.id } },
          el('td', { class: 'num', text: String(a.rank ?? j + 1) }),
          el('td', {}, el('code', { class: 'tokentext', text: visible(a.text) })),
          el('td', { class: 'raw-p', data: { p: ap } }, el('span', { class: 'barbox' }, bar), el('span', { class: 'v', text: pct(ap) })),
          el('td', { class: 'num', text: num(a.logprob) }),
          el('td', { class: 'post-p' }, el('span', { class: 'barbox' }, post), el('span', { class: 'v', text: '…' }), el('span', { class: 'removed' })),
          el('td', {}, btn)));
      });
      table.append(body);
      pane.append(el('div', { class: 'scroll-x' }, table));
    }
    pane.append(el('div', { id: 'chain', class: 'chain' }, el('span', { class: 'muted', text: 'applying the chain…' })));

    const input = el('input', { id: 'continue-text', type: 'text', placeholder: 'continue with…', spellcheck: 'false', 'aria-label': 'continue with this text' });
    const go = el('button', { type: 'button', id: 'continue-go', text: 'Branch' });
    go.disabled = S.busy || !S.branchable;
    const cont = () => { if (input.value) branchFrom({ text: input.value }); };
    go.addEventListener('click', cont);
    input.addEventListener('keydown', (e) => { if (e.key === 'Enter') { e.preventDefault(); cont(); } });
    pane.append(el('div', { class: 'continue' }, input, go));
    if (!S.branchable) pane.append(el('p', { class: 'note', text: 'This run was made with another model file than the loaded one: it can be read, not branched.' }));
  }

  function requestPosition() {
    const item = S.sel;
    if (!item || !S.branchable || S.tree === null) {
      for (const v of document.querySelectorAll('#alts .post-p .v')) v.textContent = '—';
    }
    if (!item || !S.branchable) {
      if (item && !S.branchable) $('chain').replaceChildren(el('span', { class: 'muted', text: 'the sampler chain needs the run\'s model loaded' }));
      return;
    }
    if (S.tree === null) { // a sample of a stored run: it becomes a tree (nothing decoded) before the chain or a branch
      const btn = el('button', { type: 'button', id: 'explore-btn', class: 'small', text: 'Explore this sample' });
      btn.addEventListener('click', () => adoptSelected().then(requestPosition, (e) => setStatus('error', 'Error: ' + e.message)));
      $('chain').replaceChildren(el('p', { class: 'note' }, 'This run is not a tree. ', btn,
        ' copies this sample into a new tree (nothing is decoded) to see the sampler chain live and to branch.'));
      return;
    }
    let settings;
    try { settings = readSettings(); } catch (e) { return; }
    const owner = S.branches.get(item.owner);
    const top = (item.rec.top || []).length || readInt('top-n', 1, 1000);
    const seq = ++S.posSeq;
    if (S.posAbort) S.posAbort.abort();
    S.posAbort = new AbortController();
    const t0 = performance.now();
    $('pos').classList.add('pending');
    api('/api/position', { tree: S.tree, branch: owner.branch, at: item.pos, settings, top }, S.posAbort.signal)
      .then((res) => { if (seq === S.posSeq) { $('pos').classList.remove('pending'); showPost(res, performance.now() - t0); } })
      .catch((e) => {
        if (e.name === 'AbortError' || seq !== S.posSeq) return;
        $('pos').classList.remove('pending');
        const c = $('chain');
        if (c) c.replaceChildren(el('span', { class: 'error', text: e.message }));
      });
  }

  function showPost(res, roundtrip) {
    const table = $('alts');
    const idx = new Map((res.top || []).map((a, j) => [a.id, j]));
    const probs = (res.final && res.final.probs) || [];
    const removed = res.removed_by || [];
    if (table) {
      const maxP = Math.max(...probs.filter((x) => typeof x === 'number'), 1e-12);
      for (const row of table.querySelectorAll('tr.alt')) {
        const j = idx.get(Number(row.dataset.id));
        const cell = row.querySelector('.post-p');
        const bar = cell.querySelector('.bar');
        const v = cell.querySelector('.v');
        const rm = row.querySelector('.removed');
        if (j === undefined) { v.textContent = '—'; bar.style.width = '0%'; rm.textContent = ''; delete cell.dataset.p; continue; }
        const q = probs[j] || 0;
        cell.dataset.p = String(q);
        v.textContent = removed[j] ? '' : pct(q);
        bar.style.width = (100 * q / maxP).toFixed(1) + '%';
        rm.textContent = removed[j] ? '✕ ' + removed[j] : '';
        rm.title = removed[j] ? `removed by ${removed[j]}` : '';
        cell.dataset.removedBy = removed[j] || '';
        row.classList.toggle('gone', !!removed[j]);
      }
    }
    const chain = $('chain');
    if (!chain) return;
    const steps = el('ol', { class: 'stages', 'aria-label': 'survivors after each stage' });
    for (const st of res.chain || []) steps.append(el('li', { data: { stage: st.stage } }, el('span', { class: 'stage', text: st.stage }), ' ', el('b', { text: String(st.survivors) })));
    const final = res.final || {};
    chain.replaceChildren(
      el('div', { class: 'chain-head' }, el('span', { text: 'Sampler chain: survivors per stage' }),
        el('span', { class: 'ms', id: 'pos-ms', title: 'server time; the round trip in brackets', data: { ms: res.ms } },
          `${num(res.ms, 1)} ms (${roundtrip.toFixed(0)} ms)`)),
      steps,
      el('p', { class: 'final' }, 'final candidate set: ', el('b', { id: 'final-survivors', text: String(final.survivors ?? '—') }),
        typeof res.entropy === 'number' ? `  ·  raw entropy ${num(res.entropy)} nats` : ''));
    // per-stage probabilities of the top tokens
    if ((res.chain || []).length && (res.top || []).length) {
      const rows = res.top.slice(0, 12);
      const t = el('table', { class: 'stage-probs' }, el('thead', {}, el('tr', {}, el('th', { text: 'token' }),
        res.chain.map((st) => el('th', { text: st.stage })), el('th', { text: 'final' }))));
      const tb = el('tbody');
      rows.forEach((a, j) => tb.append(el('tr', {}, el('td', {}, el('code', { class: 'tokentext', text: visible(a.text) })),
        res.chain.map((st) => el('td', { class: 'num', text: pct((st.probs || [])[j]) })), el('td', { class: 'num', text: pct(probs[j]) }))));
      t.append(tb);
      chain.append(el('details', { class: 'per-stage' }, el('summary', { text: 'probabilities after each stage' }), el('div', { class: 'scroll-x' }, t)));
    }
  }

  // --------------------------------------------------------------------------------------------- streams
  function parseEvent(block) {
    let type = null;
    const data = [];
    for (const line of block.split('\n')) {
      if (line.startsWith('event:')) type = line.slice(6).trim();
      else if (line.startsWith('data:')) data.push(line.slice(5).replace(/^ /, ''));
    }
    if (!data.length) return null;
    let obj;
    try { obj = JSON.parse(data.join('\n')); } catch (_) { return null; }
    if (obj && typeof obj === 'object') obj.type = obj.type || obj.event || type;
    return obj;
  }

  async function runStream(url, body, onStartExtra) {
    setBusy(true);
    setStatus('sending', 'Sending…');
    S.stream = new AbortController();
    S.started = false;
    let key = null;
    let n = 0;
    let ended = false;
    const handle = (ev) => {
      if (!ev) return;
      if (ev.type === 'queued') setStatus('queued', ev.ahead ? `Queued (${ev.ahead} ahead)` : 'Starting…');
      else if (ev.type === 'start') {
        S.started = true;
        if (S.tree === null || keyOf(ev.tree) !== keyOf(S.tree)) { // a new tree
          S.tree = ev.tree;
          S.run = null;
          S.treeName = '';
          S.branchable = true;
          S.branches = new Map();
          S.compare = [];
        }
        key = keyOf(ev.branch);
        const b = normBranch({ ...onStartExtra, ...ev, tokens: [] });
        S.branches.set(key, b);
        S.current = key;
        S.sel = null;
        renderPosition();
        renderView();
        renderTree();
        setStatus('generating', 'Generating (0 tokens)');
      } else if (ev.type === 'token') {
        const rec = ev.record || ev.token || ev.rec;
        const b = S.branches.get(key);
        if (!b || !rec) return;
        b.tokens.push(rec);
        n += 1;
        appendToken(key);
        setStatus('generating', `Generating (${n} token${n === 1 ? '' : 's'})`);
      } else if (ev.type === 'done') {
        ended = true;
        const b = S.branches.get(key);
        if (b) { b.finish_reason = ev.finish_reason; if (typeof ev.text === 'string') b.text = ev.text; }
        const ttft = typeof ev.first_token_ms === 'number' ? `, first token ${ev.first_token_ms.toFixed(0)} ms` : '';
        setStatus('done', `Done (${ev.finish_reason || 'finished'}, ${n} token${n === 1 ? '' : 's'}${ttft})`);
      } else if (ev.type === 'error') {
        ended = true;
        setStatus('error', 'Error: ' + (ev.message || 'unknown'));
      }
    };
    try {
      const res = await fetch(url, { method: 'POST', credentials: 'same-origin', signal: S.stream.signal,
        headers: { 'Content-Type': 'application/json', Accept: 'text/event-stream' }, body: JSON.stringify(body) });
      if (!res.ok) throw new Error(await errorText(res));
      const reader = res.body.getReader();
      const dec = new TextDecoder();
      let buf = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true }).replace(/\r\n?/g, '\n');
        let k;
        while ((k = buf.indexOf('\n\n')) >= 0) {
          handle(parseEvent(buf.slice(0, k)));
          buf = buf.slice(k + 2);
        }
      }
      buf += dec.decode();
      if (buf.trim()) handle(parseEvent(buf));
      if (!ended) setStatus('error', `The stream ended without a result (${n} tokens)`);
    } catch (e) {
      if (e.name === 'AbortError') setStatus('done', key === null ? 'Cancelled before it started' : `Cancelled (${n} tokens)`);
      else setStatus('error', 'Error: ' + e.message);
    } finally {
      S.stream = null;
      setBusy(false);
    }
    if (key !== null && S.tree !== null) {
      await reloadTree(key);
      const b = S.branches.get(key);
      if (b && b.parent !== null && !S.sel && S.current === key) { // show where the branch left its parent
        const j = S.items.findIndex((x) => x.pos === b.at);
        if (j >= 0) { S.sel = S.items[j]; markSelected(j, false); renderPosition(); requestPosition(); }
      }
      loadRuns();
    }
  }

  /** The sampler settings, max tokens and alternatives a generation asks for, or null (the status says why). */
  function readRequest() {
    const limits = (S.info && S.info.limits) || {};
    try {
      return {
        settings: readSettings(),
        max_tokens: readInt('max-tokens', 1, limits.max_tokens || 4096),
        top: readInt('top-n', 1, limits.max_top || 100),
      };
    } catch (e) { setStatus('error', e.message); return null; }
  }

  /** One message of the chat: its role (user, assistant) and its text; a button removes it. */
  function addMessage(role, content) {
    const n = document.querySelectorAll('#chat-messages .chat-msg').length + 1;
    const sel = el('select', { class: 'chat-role', 'aria-label': `message ${n} role` },
      ['user', 'assistant'].map((r) => el('option', { value: r, text: r })));
    sel.value = role;
    const text = el('textarea', { class: 'chat-content', rows: 3, spellcheck: 'false', 'aria-label': `message ${n}` });
    text.value = content;
    if (S.maxChars) text.maxLength = S.maxChars;
    text.addEventListener('keydown', (e) => { if (e.key === 'Enter' && (e.ctrlKey || e.metaKey) && !S.busy) generate(); });
    const box = el('div', { class: 'chat-msg' });
    const rm = el('button', { type: 'button', class: 'small chat-remove', 'aria-label': `remove message ${n}`, text: '✕',
      onclick: () => { if (document.querySelectorAll('#chat-messages .chat-msg').length > 1) box.remove(); } });
    box.append(el('div', { class: 'chat-head' }, sel, rm), text);
    $('chat-messages').append(box);
    return box;
  }

  function generate() {
    const body = readRequest();
    if (!body) return;
    let extra;
    if ($('mode-chat').checked) {
      const messages = [...document.querySelectorAll('#chat-messages .chat-msg')].map((m) => ({
        role: m.querySelector('.chat-role').value, content: m.querySelector('.chat-content').value }));
      body.chat = { system: $('chat-system').value, messages };
      extra = {};
    } else {
      body.prompt = $('prompt').value;
      extra = { prompt: body.prompt };
    }
    S.tree = null; // a generation starts a new tree
    runStream('/api/generate', body, extra);
  }

  /** The selected sample of a stored run (not a tree) copied into a new tree, and the view moved to it. */
  async function adoptSelected() {
    const item = S.sel;
    const owner = S.branches.get(item.owner);
    setStatus('loading', `Copying sample ${owner.branch} of run ${S.run} into a new tree…`);
    const r = await api('/api/adopt', { run: S.run, sample: owner.branch });
    const data = await api('/api/trees/' + encodeURIComponent(r.tree));
    loadTreeData(data, true, keyOf(r.branch));
    const j = S.items.findIndex((x) => x.pos === item.pos);
    S.sel = j >= 0 ? S.items[j] : null;
    renderPosition();
    if (j >= 0) markSelected(j, false);
    setStatus('done', `Sample copied into tree ${r.tree}`);
    loadRuns();
  }

  async function branchFrom(what) {
    if (!S.sel || S.busy) return;
    if (S.tree === null) {
      try { await adoptSelected(); } catch (e) { setStatus('error', 'Error: ' + e.message); return; }
    }
    const item = S.sel;
    if (!item) return;
    const request = readRequest();
    if (!request) return;
    const owner = S.branches.get(item.owner);
    const body = { tree: S.tree, branch: owner.branch, at: item.pos, ...request, ...what };
    runStream('/api/branch', body, { parent: owner.branch, at: item.pos, prompt: owner.prompt, prompt_tokens: owner.prompt_tokens });
  }

  /** Cancel this page's generation: a running one stops after its current token (what it made is stored); one
      still waiting in the queue is dropped (leaving its stream drops it). */
  async function cancel() {
    if (S.stream && !S.started) { S.stream.abort(); return; }
    try {
      const r = await api('/api/cancel', {});
      if (!r.cancelled) setStatus($('status').dataset.state, $('status').textContent + ' (nothing to cancel)');
    } catch (e) { setStatus('error', 'Cancel failed: ' + e.message); }
  }

  // ------------------------------------------------------------------------------------------------ tree
  function loadTreeData(data, branchable, keepKey) {
    S.tree = data.tree === undefined || data.tree === null ? null : data.tree;
    S.run = S.tree === null ? (data.run ?? data.id ?? null) : null;
    S.treeName = data.name || '';
    S.branchable = branchable;
    const old = S.branches;
    S.branches = new Map();
    for (const b of data.branches || []) {
      const nb = normBranch(b);
      const prev = old.get(keyOf(b.branch));
      if (nb.prompt === undefined) nb.prompt = prev && prev.prompt !== undefined ? prev.prompt : data.prompt;
      S.branches.set(keyOf(b.branch), nb);
    }
    S.compare = S.compare.filter((k) => S.branches.has(k));
    S.current = keepKey && S.branches.has(keepKey) ? keepKey : (S.branches.size ? S.branches.keys().next().value : null);
    renderView();
    renderTree();
    renderCompare();
  }

  async function reloadTree(key) {
    try {
      const data = await api('/api/trees/' + encodeURIComponent(S.tree));
      const sel = S.sel;
      loadTreeData(data, true, key);
      if (sel) { // re-select the same position with the server's records
        const j = S.items.findIndex((x) => x.owner === sel.owner && x.pos === sel.pos);
        if (j >= 0) { S.sel = S.items[j]; markSelected(j, false); } else { S.sel = null; renderPosition(); }
      }
    } catch (e) {
      renderTree(); // keep what was streamed
    }
  }

  function renderTree() {
    const box = $('tree');
    box.replaceChildren();
    box.dataset.tree = S.tree === null ? '' : String(S.tree);
    const where = S.tree !== null ? `tree ${S.tree}` : S.run !== null ? `run ${S.run}` : '';
    $('tree-name').textContent = where ? (S.treeName && S.treeName !== where ? `${S.treeName} ` : '') + `(${where})` : '';
    if (!S.branches.size) { box.append(el('p', { class: 'hint', text: 'No branches yet.' })); return; }
    const kids = new Map();
    const roots = [];
    for (const [k, b] of S.branches) {
      const pk = b.parent === null ? null : keyOf(b.parent);
      if (pk === null || !S.branches.has(pk)) roots.push(k);
      else { if (!kids.has(pk)) kids.set(pk, []); kids.get(pk).push(k); }
    }
    const node = (k, depth) => {
      const b = S.branches.get(k);
      const check = el('input', { type: 'checkbox', class: 'cmp-check', 'aria-label': `compare branch ${b.branch}`, data: { branch: k } });
      check.checked = S.compare.includes(k);
      check.addEventListener('change', () => toggleCompare(k, check.checked));
      const forced = b.forced && b.forced.length ? b.forced.map((f) => f.text).join('') : null;
      const ml = meanLogprob(k);
      const btn = el('button', { type: 'button', class: 'node-btn' + (k === S.current ? ' current' : ''), 'aria-pressed': k === S.current ? 'true' : 'false' },
        el('b', { text: branchLabel(b) }),
        b.parent !== null ? el('span', { class: 'at', text: ` @${b.at} ` }) : null,
        forced !== null ? el('code', { class: 'tokentext forced-tk', text: visible(forced) }) : null,
        el('span', { class: 'ml', title: 'mean logprob of its whole sequence', text: isFinite(ml) ? ` ${num(ml, 2)}` : '' }),
        el('span', { class: 'snip', text: ' ' + snippet(b.text || b.tokens.map((r) => (r.eog ? '' : r.text)).join(''), 48) }),
        b.finish_reason ? null : el('span', { class: 'muted', text: ' …' }));
      btn.addEventListener('click', () => { S.current = k; S.sel = null; renderPosition(); renderView(); renderTree(); });
      const li = el('li', { class: 'node', data: { branch: k, depth } }, el('div', { class: 'node-row' }, check, btn));
      const ch = kids.get(k);
      if (ch) li.append(el('ul', {}, ch.map((c) => node(c, depth + 1))));
      return li;
    };
    box.append(el('ul', { class: 'tree' }, roots.map((k) => node(k, 0))));
  }

  // --------------------------------------------------------------------------------------------- compare
  function toggleCompare(k, on) {
    S.compare = S.compare.filter((x) => x !== k);
    if (on) S.compare.push(k);
    while (S.compare.length > 2) S.compare.shift();
    for (const c of document.querySelectorAll('.cmp-check')) c.checked = S.compare.includes(c.dataset.branch);
    renderCompare();
  }

  function renderCompare() {
    const box = $('compare');
    if (S.compare.length !== 2) { box.hidden = true; box.replaceChildren(); return; }
    const [ka, kb] = S.compare;
    const A = fullTokens(ka);
    const B = fullTokens(kb);
    let d = 0;
    while (d < A.length && d < B.length && A[d].rec.id === B[d].rec.id) d++;
    const same = d === A.length && d === B.length;
    box.hidden = false;
    box.replaceChildren(el('h2', {}, 'Compare ', el('span', { id: 'cmp-at', data: { at: d }, text: same ? 'identical sequences' : `diverge at position ${d}` }),
      el('button', { type: 'button', class: 'small', text: 'Close', onclick: () => { toggleCompare(ka, false); toggleCompare(kb, false); } })));
    const cols = el('div', { class: 'cmp-cols' });
    for (const [k, T] of [[ka, A], [kb, B]]) {
      const b = S.branches.get(k);
      const lp = T.map((x) => x.rec.logprob).filter((x) => typeof x === 'number');
      const all = lp.reduce((s, x) => s + x, 0);
      const from = T.slice(d).map((x) => x.rec.logprob).filter((x) => typeof x === 'number');
      const tail = from.reduce((s, x) => s + x, 0);
      const stats = el('dl', { class: 'stats' },
        el('dt', { text: 'tokens' }), el('dd', { class: 'cmp-n', text: String(T.length) }),
        el('dt', { text: `logprob from ${d}` }), el('dd', { class: 'cmp-tail', text: num(tail) }),
        el('dt', { text: 'logprob, all' }), el('dd', { class: 'cmp-all', text: num(all) }),
        el('dt', { text: 'mean logprob' }), el('dd', { class: 'cmp-mean', text: lp.length ? num(all / lp.length) : '—' }),
        el('dt', { text: `mean from ${d}` }), el('dd', { text: from.length ? num(tail / from.length) : '—' }));
      const text = el('div', { class: 'tokens cmp-text' });
      T.forEach((x, i) => {
        if (i === d) text.append(el('span', { class: 'div-mark', 'aria-label': `divergence at position ${d}`, title: `position ${d}` }, '▸'));
        const span = tokenSpan({ ...x, pre: i < d, forced: x.forced }, i);
        span.removeAttribute('tabindex');
        span.removeAttribute('role');
        text.append(span);
      });
      cols.append(el('div', { class: 'cmp-col', data: { branch: k } }, el('h3', {}, `Branch #${b.branch}`,
        el('span', { class: 'muted', text: b.finish_reason ? ` · ${b.finish_reason}` : '' })), stats, text));
    }
    box.append(cols);
  }

  // ------------------------------------------------------------------------------------------------ runs
  function when(d) {
    if (typeof d === 'number') d = new Date(d > 1e12 ? d : d * 1000).toISOString();
    return typeof d === 'string' ? d.slice(5, 16).replace('T', ' ') : '';
  }

  async function loadRuns() {
    const box = $('runs');
    try {
      const runs = await api('/api/runs');
      box.replaceChildren();
      if (!runs.length) { box.append(el('p', { class: 'hint', text: 'The store has no runs yet.' })); return; }
      const tb = el('tbody');
      for (const r of runs.slice().reverse().slice(0, 200)) {
        const open = el('button', { type: 'button', class: 'small link', text: r.name || `${r.kind || 'run'} ${r.id}`, title: `open run ${r.id}` });
        open.addEventListener('click', () => openRun(r.id));
        tb.append(el('tr', { data: { run: r.id } }, el('td', { class: 'num', text: String(r.id) }), el('td', {}, open), el('td', { text: r.kind || '' }),
          el('td', { class: 'num', text: String(r.samples ?? r.samples_done ?? '') }), el('td', { text: r.status || '' }), el('td', { class: 'date', text: when(r.date ?? r.created) })));
      }
      box.replaceChildren(el('div', { class: 'scroll-y' }, el('table', { class: 'runs' }, el('thead', {}, el('tr', {},
        ['id', 'name', 'kind', 'samples', 'status', 'date'].map((h) => el('th', { scope: 'col', text: h })))), tb)));
    } catch (e) {
      box.replaceChildren(el('p', { class: 'error', text: 'Runs: ' + e.message }));
    }
  }

  async function openRun(id) {
    if (S.busy) { setStatus($('status').dataset.state, 'Wait for the generation to finish (or cancel it) before opening a run.'); return; }
    try {
      setStatus('loading', `Opening run ${id}…`);
      const data = await api('/api/runs/' + encodeURIComponent(id));
      S.sel = null;
      S.compare = [];
      renderPosition();
      loadTreeData(data, data.branchable !== false, null);
      setStatus('done', `Run ${id}${data.name ? ' (' + data.name + ')' : ''}: ${S.branches.size} sample${S.branches.size === 1 ? '' : 's'}` +
        (data.branchable === false ? ', made with another model: read only' : ''));
    } catch (e) { setStatus('error', 'Error: ' + e.message); }
  }

  // ------------------------------------------------------------------------------------------ colours
  const PROB_LABELS = ['<10%', '10–20%', '20–30%', '30–40%', '40–50%', '50–60%', '60–70%', '70–80%', '80–90%', '≥90%'];
  const RANK_LABELS = ['rank 1', '2–10', '11–100', '>100'];
  function renderLegend() {
    document.body.dataset.colour = S.colour;
    const btn = $('colour-mode');
    btn.textContent = S.colour === 'prob' ? 'Colour: probability' : 'Colour: rank';
    btn.setAttribute('aria-pressed', S.colour === 'rank' ? 'true' : 'false');
    const lg = $('legend');
    lg.replaceChildren();
    if (S.colour === 'prob') PROB_LABELS.forEach((t, i) => lg.append(el('span', { class: 'sw p' + i, text: t })));
    else RANK_LABELS.forEach((t, i) => lg.append(el('span', { class: 'sw r' + i, text: t })));
    lg.append(el('span', { class: 'sw forced-demo', text: 'forced' }), el('span', { class: 'sw pre-demo', text: 'parent\'s prefix' }));
  }

  // --------------------------------------------------------------------------------------------- start
  async function init() {
    renderLegend();
    $('colour-mode').addEventListener('click', () => { S.colour = S.colour === 'prob' ? 'rank' : 'prob'; renderLegend(); });
    $('generate').addEventListener('click', generate);
    $('cancel').addEventListener('click', cancel);
    $('runs-refresh').addEventListener('click', loadRuns);
    $('preset').addEventListener('change', () => { if ($('preset').value !== '__custom') applyPreset($('preset').value); });
    for (const r of document.querySelectorAll('input[name=mode]')) r.addEventListener('change', () => {
      const chat = $('mode-chat').checked;
      $('chat-input').hidden = !chat;
      $('text-input').hidden = chat;
    });
    $('prompt').addEventListener('keydown', (e) => { if (e.key === 'Enter' && (e.ctrlKey || e.metaKey) && !S.busy) generate(); });
    $('chat-add').addEventListener('click', () => {
      const msgs = document.querySelectorAll('#chat-messages .chat-msg');
      const last = msgs.length ? msgs[msgs.length - 1].querySelector('.chat-role').value : 'assistant';
      addMessage(last === 'user' ? 'assistant' : 'user', '').querySelector('textarea').focus();
    });
    addMessage('user', 'Name three rivers in France.');
    const tokens = $('tokens');
    tokens.addEventListener('click', (e) => { const s = e.target.closest('.tk'); if (s) selectToken(Number(s.dataset.i)); });
    tokens.addEventListener('keydown', onTokensKey);
    try {
      const info = await api('/api/info');
      S.info = info;
      // the llama-cpp-python chain's fields, then the llama.cpp chain's own (sent only with that chain, or when changed)
      S.defaults = { ...(info.settings || {}) };
      S.cppOnly = new Set();
      for (const [k, v] of Object.entries(info.llama_cpp || {})) if (!(k in S.defaults)) { S.defaults[k] = v; S.cppOnly.add(k); }
      const presets = {};
      for (const [name, p] of Object.entries(info.presets || {})) if (Object.keys(p).every((k) => k in S.defaults)) presets[name] = p;
      S.info.presets = presets;
      buildSettings(S.defaults, presets);
      const m = info.model || {};
      $('model').textContent = `${m.name || m.path || 'model'}` + (m.n_vocab ? ` · ${m.n_vocab.toLocaleString('en')} tokens` : '') + (m.n_ctx ? ` · ctx ${m.n_ctx}` : '');
      $('model').title = m.path || '';
      if (!m.chat_template) {
        $('mode-chat').disabled = true;
        $('chat-note').hidden = false;
        $('chat-note').textContent = 'Chat: the model has no template; restart with --chat-template NAME ' +
          '(a llama.cpp built-in: chatml, gemma, llama3…) or FILE.jinja.';
      }
      const lim = info.limits || {};
      if (lim.max_tokens) $('max-tokens').max = lim.max_tokens;
      if (lim.max_top) $('top-n').max = lim.max_top;
      if (lim.max_prompt_chars) { $('prompt').maxLength = lim.max_prompt_chars; S.maxChars = lim.max_prompt_chars; }
    } catch (e) {
      setStatus('error', 'Cannot reach the server: ' + e.message);
      return;
    }
    loadRuns();
    try {
      const st = await api('/api/state');
      if (st.running) setStatus('busy', `The server is generating (tree ${st.running.tree}); ${st.queued || 0} queued. Yours will wait its turn.`);
    } catch (_) { /* optional */ }
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
  else init();
})();
