// archon-server console: plain JavaScript, no build step, no library (the page is small enough that a framework
// would cost more than it saves, and nothing has to be fetched from a CDN). Talks only to this server's /v1 API.
"use strict";

const KEY_STORE = "archon-console-key";
const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) e.append(c instanceof Node ? c : String(c));
  return e;
}
function svg(tag, attrs = {}) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}
const fmtS = (s) => (s === null || s === undefined ? "–" : s < 1 ? `${Math.round(s * 1000)} ms` : `${s.toFixed(2)} s`);
const fmtN = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en"));

// ---------------------------------------------------------------- messages
function banner(text, kind = "error") {
  const b = $("#banner");
  if (!text) { b.hidden = true; b.textContent = ""; return; }
  b.hidden = false; b.className = "banner" + (kind === "info" ? " info" : ""); b.textContent = text;
}
function setConn(ok, text) {
  $("#conn-state").className = "dot " + (ok ? "ok" : "bad");
  $("#conn-text").textContent = text;
}

// ---------------------------------------------------------------- API access (bearer key in sessionStorage)
class ApiError extends Error {
  constructor(message, status, unreachable = false) { super(message); this.status = status; this.unreachable = unreachable; }
}
function headers(json = true) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}
async function errorOf(resp) {
  let msg = `${resp.status} ${resp.statusText}`;
  try { const j = await resp.json(); if (j && j.error) msg = `${resp.status}: ${j.error.message}`; } catch (_) { /* not JSON */ }
  return new ApiError(msg, resp.status);
}
async function request(path, { method = "GET", body, signal } = {}) {
  let resp;
  try {
    resp = await fetch(path, { method, headers: headers(body !== undefined), body: body === undefined ? undefined : JSON.stringify(body), signal });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    setConn(false, "unreachable");
    throw new ApiError(`The server is unreachable (${location.origin}): ${e.message}. Is archon serve running?`, 0, true);
  }
  if (resp.status === 401) {
    await askKey("The server refused the request (401): it needs an API key.");
    throw new ApiError("401: a valid API key is needed (enter it with the key button).", 401);
  }
  if (!resp.ok) throw await errorOf(resp);
  return resp;
}
const getJSON = async (path) => (await request(path)).json();
const postJSON = async (path, body) => (await request(path, { method: "POST", body })).json();

let keyPrompt = null;
function askKey(reason) {
  if (keyPrompt) return keyPrompt;
  const dlg = $("#key-dialog");
  if (reason) banner(reason);
  $("#key-input").value = "";
  keyPrompt = new Promise((resolve) => {
    dlg.addEventListener("close", () => {
      if (dlg.returnValue === "ok" && $("#key-input").value.trim()) sessionStorage.setItem(KEY_STORE, $("#key-input").value.trim());
      else if (dlg.returnValue === "clear") sessionStorage.removeItem(KEY_STORE);
      keyPrompt = null;
      resolve();
      if (dlg.returnValue === "ok" || dlg.returnValue === "clear") boot();
      else if (reason) banner("This server needs an API key: enter it with the key button (top right).");
    }, { once: true });
    dlg.returnValue = "";
    if (!dlg.open) dlg.showModal();
  });
  return keyPrompt;
}

// Streams a chat completion; calls onEvent(kind, payload) for "text", "trace_event", "final" chunks.
async function streamChat(body, onEvent, signal) {
  const resp = await request("/v1/chat/completions", { method: "POST", body, signal });
  const reader = resp.body.getReader();
  const dec = new TextDecoder();
  let buf = "", id = null, sawDone = false;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut); buf = buf.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;  // ": keep-alive" comments and the like
        const data = line.slice(5).trim();
        if (data === "[DONE]") { sawDone = true; continue; }
        const j = JSON.parse(data);
        if (j.error) throw new ApiError("The request failed: " + j.error.message, 502);
        id = id || j.id;
        if (j.trace_event) onEvent("trace_event", j.trace_event);
        for (const ch of j.choices || []) if (ch.delta && ch.delta.content) onEvent("text", ch.delta.content, ch.index);
        if (j.usage || j.trace) onEvent("final", { usage: j.usage, trace: j.trace });
      }
    }
  }
  if (!sawDone) throw new ApiError("The stream ended early (connection closed before [DONE]).", 0);
  return id;
}

// ---------------------------------------------------------------- models / catalog
let MODELS = [];
function fillModelSelect(sel, preferred) {
  sel.textContent = "";
  const arch = MODELS.filter((m) => m.kind !== "backend"), back = MODELS.filter((m) => m.kind === "backend");
  const g1 = el("optgroup", { label: "architectures" }), g2 = el("optgroup", { label: "backend models (straight through)" });
  for (const m of arch) g1.append(el("option", { value: m.id, text: m.id, title: m.description || "" }));
  for (const m of back) g2.append(el("option", { value: m.id, text: m.id }));
  if (arch.length) sel.append(g1);
  if (back.length) sel.append(g2);
  if (preferred && MODELS.some((m) => m.id === preferred)) sel.value = preferred;
}

async function boot() {
  try {
    const models = await getJSON("/v1/models");
    MODELS = models.data;
    setConn(true, `${location.host} · ${MODELS.filter((m) => m.kind !== "backend").length} architectures`);
    banner(null);
    const pg = $("#pg-model");
    fillModelSelect(pg, pg.value || "self-moa");
    const prefs = ["self-moa", "moa-lite", "best-of-n"];
    $$(".cmp-model").forEach((s, i) => fillModelSelect(s, s.value || prefs[i]));
    loadYaml();
    refreshRecent();
  } catch (e) {
    setConn(false, e.unreachable ? "unreachable" : "error");
    if (e.status !== 401) banner(e.message);
  }
}

// ---------------------------------------------------------------- playground: YAML editing with live validation
let yamlSpec = null;  // the validated architecture (normalised) when the YAML is valid
async function loadYaml() {
  const name = $("#pg-model").value;
  if (!name) return;
  try {
    const a = await getJSON("/v1/architectures/" + encodeURIComponent(name));
    $("#pg-yaml").value = a.yaml;
  } catch (e) {
    $("#pg-yaml").value = `name: ${name}-edited\nlayers:\n  - - {type: generator, model: ${name}, samples: 1}\n`;
  }
  validateYaml();
}
let validateTimer = null, validateSeq = 0;
function validateYaml() {
  clearTimeout(validateTimer);
  validateTimer = setTimeout(async () => {
    const seq = ++validateSeq, st = $("#pg-yaml-status");
    try {
      const r = await postJSON("/v1/architectures/validate", { text: $("#pg-yaml").value });
      if (seq !== validateSeq) return;
      if (r.valid) {
        yamlSpec = r.architecture;
        st.className = "status ok";
        st.textContent = `valid: ${r.name}, ${r.graph.length} layer(s), at most ${r.calls_estimate} backend calls per query`;
      } else {
        yamlSpec = null;
        st.className = "status bad";
        st.textContent = r.errors.join("\n");
      }
    } catch (e) { st.className = "status bad"; st.textContent = e.message; }
  }, 250);
}

// ---------------------------------------------------------------- live graph
function drawGraph(box, graph) {
  box.textContent = "";
  graph.forEach((layer, li) => {
    const col = el("div", { class: "g-layer", "data-layer": li },
      el("h4", { text: `layer ${li}` }), el("div", { class: "meta", text: "waiting" }));
    for (const c of layer) {
      col.append(el("div", { class: "g-comp", "data-comp": c.id },
        el("b", { text: c.id }), " ", el("span", { class: "type", text: `${c.type}${c.models.length ? " · " + c.models.join(", ") : ""}${c.samples > 1 ? " ×" + c.samples : ""}` }),
        el("div", { class: "calls" })));
    }
    box.append(col);
  });
}
function graphEvent(box, ev) {
  const layer = box.querySelector(`.g-layer[data-layer="${ev.layer}"]`);
  if (ev.type === "run_started") { drawGraph(box, ev.graph); return; }
  if (!layer) return;
  if (ev.type === "layer_started") {
    layer.classList.add("running");
    $(".meta", layer).textContent = `running · ${ev.candidates_in} candidate(s) in`;
  } else if (ev.type === "layer_ended") {
    layer.classList.remove("running");
    const failed = ev.failures && ev.failures.length && !ev.candidates_out;
    if (failed) layer.classList.add("failed");
    $(".meta", layer).textContent = `${ev.candidates_in} in → ${ev.candidates_out} out · ${fmtS(ev.latency_s)}` +
      (ev.failures && ev.failures.length ? ` · ${ev.failures.length} failure(s)` : "");
  } else if (ev.type === "call_started") {
    const comp = layer.querySelector(`.g-comp[data-comp="${CSS.escape(ev.component)}"]`) || layer;
    const calls = $(".calls", comp) || comp;
    calls.append(el("div", { class: "g-call pending", "data-call": ev.call,
      text: `#${ev.call} ${ev.model}${ev.n > 1 ? " n=" + ev.n : ""}${ev.purpose ? " · " + ev.purpose : ""}` }));
  } else if (ev.type === "call_ended") {
    let chip = box.querySelector(`.g-call[data-call="${ev.call}"]`);
    if (!chip) { graphEvent(box, { ...ev, type: "call_started" }); chip = box.querySelector(`.g-call[data-call="${ev.call}"]`); }
    chip.className = "g-call " + (ev.ok ? "ok" : "failed");
    chip.textContent = `#${ev.call} ${ev.model}${ev.n > 1 ? " n=" + ev.n : ""} · ${fmtS(ev.latency_s)} · ${ev.prompt_tokens}+${ev.completion_tokens} tok` +
      (ev.ok ? "" : ` · ${ev.status || "error"}: ${ev.error || ""}`);
    chip.title = ev.purpose || "";
  }
}

// ---------------------------------------------------------------- playground: send
let running = null, lastTrace = null;
function paramsFrom(prefix) {
  const p = {};
  for (const k of ["temperature", "top_p", "max_tokens", "seed"]) {
    const v = $(`#${prefix}-${k}`) && $(`#${prefix}-${k}`).value.trim();
    if (v) p[k] = Number(v);
  }
  const stop = $(`#${prefix}-stop`) && $(`#${prefix}-stop`).value;
  if (stop) p.stop = [stop];
  return p;
}
async function send() {
  const prompt = $("#pg-prompt").value.trim();
  if (!prompt) { $("#pg-status").className = "status bad"; $("#pg-status").textContent = "type a prompt first"; return; }
  const useYaml = $("#pg-use-yaml").checked;
  if (useYaml && !yamlSpec) { $("#pg-status").className = "status bad"; $("#pg-status").textContent = "the YAML is not valid (see the errors above)"; return; }
  const body = { model: $("#pg-model").value, messages: [{ role: "user", content: prompt }], stream: true,
    stream_options: { include_usage: true }, stream_trace: true, return_trace: true, ...paramsFrom("pg") };
  if (useYaml) body.architecture = yamlSpec;
  const answer = $("#pg-answer"), graph = $("#pg-graph"), st = $("#pg-status");
  answer.textContent = ""; graph.textContent = ""; $("#pg-summary").textContent = ""; $("#pg-open-trace").disabled = true;
  answer.classList.remove("bad-text");
  st.className = "status"; st.textContent = "running…"; banner(null);
  running = new AbortController();
  $("#pg-send").disabled = true; $("#pg-stop-btn").disabled = false;
  const t0 = performance.now();
  let final = null;
  try {
    const id = await streamChat(body, (kind, payload) => {
      if (kind === "text") answer.textContent += payload;
      else if (kind === "trace_event") graphEvent(graph, payload);
      else if (kind === "final") final = payload;
    }, running.signal);
    const secs = (performance.now() - t0) / 1000;
    st.className = "status ok"; st.textContent = `done in ${fmtS(secs)}`;
    if (final && final.trace) {
      const u = final.trace.usage;
      $("#pg-summary").textContent = `${final.trace.calls} backend calls · ${fmtN(u.prompt_tokens)} prompt + ${fmtN(u.completion_tokens)} completion tokens · graph ${fmtS(final.trace.latency_s)}`;
      lastTrace = { id, object: "trace", model: body.model, status: "ok", http_status: 200, prompt, messages: body.messages,
        answers: [answer.textContent], trace: final.trace, created: Math.floor(Date.now() / 1000) };
      showTrace(lastTrace, false);
      $("#pg-open-trace").disabled = false;
    }
    refreshRecent();
  } catch (e) {
    if (e.name === "AbortError") { st.className = "status"; st.textContent = "stopped"; }
    else {
      st.className = "status bad"; st.textContent = "failed";
      banner(e.message);
      answer.classList.add("bad-text");
      if (!answer.textContent) answer.textContent = e.message;
      refreshRecent();
    }
  } finally {
    running = null; $("#pg-send").disabled = false; $("#pg-stop-btn").disabled = true;
  }
}

// ---------------------------------------------------------------- trace view
let shownTrace = null, pickerItems = [];
function normalise(obj) {
  // Accepts what the server and CLI produce: a /v1/traces entry, a chat completion with `trace`, a bare trace
  // (`archon run --trace`), a sweep result with `trace` (or `traces`, one per turn; sweeps with keep_traces: true).
  if (!obj || typeof obj !== "object") return [];
  const label = obj.benchmark ? `${obj.arch} · ${obj.benchmark}/${obj.id}` : undefined;
  const extra = { prompt: obj.prompt || label, status: obj.status || (obj.error ? "error" : "ok"), error: obj.error || null };
  if (obj.trace && obj.trace.layers) return [{ ...obj, ...extra, trace: obj.trace }];
  if (Array.isArray(obj.traces)) {
    return obj.traces.filter((t) => t && t.layers).map((t, i) => ({ ...obj, ...extra, prompt: `${extra.prompt || ""} (turn ${i + 1})`, trace: t }));
  }
  if (obj.layers && obj.architecture !== undefined) return [{ id: null, model: obj.architecture, status: "ok", trace: obj }];
  return [];
}
function parseTraceFile(text) {
  const out = [];
  try { const j = JSON.parse(text); for (const x of Array.isArray(j) ? j : [j]) out.push(...normalise(x)); return out; }
  catch (_) { /* JSON lines, then */ }
  for (const line of text.split("\n")) {
    if (!line.trim()) continue;
    try { out.push(...normalise(JSON.parse(line))); } catch (_) { /* skip a bad line */ }
  }
  return out;
}

// Call timing: start_s/latency_s from the trace; older traces without start_s get each layer laid after the one before.
function timedCalls(tr) {
  const calls = [];
  let cursor = 0;
  tr.layers.forEach((layer, li) => {
    const lstart = layer.start_s !== undefined ? layer.start_s : cursor;
    for (const c of layer.calls) {
      const start = c.start_s !== undefined && (c.start_s > 0 || layer.start_s !== undefined) ? c.start_s : lstart;
      calls.push({ ...c, layer: li, start, end: start + (c.latency_s || 0) });
    }
    cursor = lstart + (layer.latency_s || 0);
  });
  return calls;
}
// The critical path: from the call that ended last, step back to the call that ended latest before it began.
function criticalPath(calls) {
  const crit = new Set();
  const eps = 0.002;
  let cur = calls.reduce((a, c) => (a === null || c.end > a.end ? c : a), null);
  let guard = calls.length + 1;
  while (cur && guard-- > 0) {
    crit.add(cur);
    const before = calls.filter((c) => !crit.has(c) && c.end <= cur.start + eps);
    cur = before.reduce((a, c) => (a === null || c.end > a.end ? c : a), null);
  }
  return crit;
}
const TYPE_COLOURS = { generator: "#5b8def", fuser: "#8e6ad8", ranker: "#2aa198", critic: "#d08c2f", verifier: "#3d9b50",
  unit_test_generator: "#b5528f", unit_test_evaluator: "#c0627a", self_moa_seq: "#4a7bb7", vote: "#777" };

function drawWaterfall(box, tr) {
  box.textContent = "";
  const calls = timedCalls(tr);
  if (!calls.length) { box.append(el("p", { class: "muted", text: "no backend calls in this trace" })); return; }
  const crit = criticalPath(calls);
  const total = Math.max(tr.latency_s || 0, ...calls.map((c) => c.end), 0.001);
  const W = Math.max(box.clientWidth - 14, 900), labelW = 300, rowH = 20, top = 24;
  const x = (t) => labelW + (t / total) * (W - labelW - 60);
  const rows = calls.length + tr.layers.length;
  const s = svg("svg", { width: W, height: top + rows * rowH + 8, role: "img", "aria-label": `waterfall of ${calls.length} calls` });
  const raw = total / 5, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((v) => v >= raw);
  for (let t = 0; t <= total + 1e-9; t += step) {  // time axis at round steps
    s.append(svg("line", { x1: x(t), x2: x(t), y1: 14, y2: top + rows * rowH, stroke: "#e4e6ee" }));
    const lab = svg("text", { x: x(t), y: 11, "text-anchor": "middle" }); lab.textContent = fmtS(t); s.append(lab);
  }
  let y = top;
  tr.layers.forEach((layer, li) => {
    const head = svg("text", { x: 4, y: y + 14, "font-weight": "600" });
    head.textContent = `layer ${li} · ${layer.components.join(", ")} · ${fmtS(layer.latency_s)}`;
    s.append(head); y += rowH;
    for (const c of calls.filter((k) => k.layer === li).sort((a, b) => a.start - b.start || a.id - b.id)) {
      const failed = c.ok === false;
      const g = svg("g", { class: "wf-bar" + (failed ? " failed" : "") + (crit.has(c) ? " critical" : ""), "data-call": c.id, "data-requests": c.requests || 1 });
      const label = svg("text", { x: 14, y: y + 14 });
      label.textContent = `#${c.id} ${c.component} · ${c.model}${c.n > 1 ? " n=" + c.n : ""}${c.purpose ? " · " + c.purpose : ""}`.slice(0, 46);
      const bar = svg("rect", { class: "bar", x: x(c.start), y: y + 4, width: Math.max(x(c.end) - x(c.start), 2), height: rowH - 7,
        fill: TYPE_COLOURS[c.type] || "#5b8def" });
      const info = svg("text", { x: Math.min(x(c.end) + 4, W - 56), y: y + 14 });
      info.textContent = failed ? (c.status || "failed") : fmtS(c.latency_s);
      const tip = svg("title");
      tip.textContent = `${c.component} (${c.type}) → ${c.model}\nstart ${fmtS(c.start)}, ${fmtS(c.latency_s)}\n` +
        `${c.prompt_tokens || 0} prompt + ${c.completion_tokens || 0} completion tokens` + (c.requests > 1 ? `, ${c.requests} requests` : "") +
        (failed ? `\nFAILED: ${c.error || c.status}` : "") + (crit.has(c) ? "\non the critical path" : "");
      g.append(tip, label, bar, info);
      s.append(g); y += rowH;
    }
  });
  box.append(s);
}

function candidateItem(c, i, tags) {
  const d = el("details", { class: "cand" });
  d.append(el("summary", {}, `[${i + 1}] `, el("span", { text: (c.text || "").slice(0, 110).replace(/\s+/g, " ") + ((c.text || "").length > 110 ? "…" : "") }),
    c.source ? el("span", { class: "tag", text: c.source }) : null, ...tags));
  d.append(el("pre", { text: c.text + (c.truncated ? "\n[… cut in the trace]" : "") }));
  return d;
}
function drawLayers(box, tr) {
  box.textContent = "";
  let prev = [];
  tr.layers.forEach((layer, li) => {
    const pt = layer.calls.reduce((a, c) => a + (c.prompt_tokens || 0), 0), ct = layer.calls.reduce((a, c) => a + (c.completion_tokens || 0), 0);
    const failedCalls = layer.calls.filter((c) => c.ok === false);
    const card = el("div", { class: "layer-card" + (failedCalls.length === layer.calls.length && layer.calls.length ? " failed" : ""), "data-layer": li },
      el("h3", { text: `Layer ${li}: ${layer.components.join(", ")}` }),
      el("div", { class: "meta", text: `${layer.candidates_in} candidate(s) in → ${layer.candidates_out} out · ${layer.calls.length} call(s) · ` +
        `${fmtS(layer.latency_s)} · ${fmtN(pt)} prompt + ${fmtN(ct)} completion tokens` }));
    for (const f of layer.failures || []) card.append(el("div", { class: "failure", text: "✗ " + f }));
    for (const n of layer.notes || []) card.append(el("div", { class: "muted", text: "note: " + n }));
    if (layer.votes && Object.keys(layer.votes).length) {
      card.append(el("div", { text: "votes: " + Object.entries(layer.votes).sort((a, b) => b[1] - a[1]).map(([k, v]) => `${k} × ${v}`).join(", ") }));
    }
    const cands = layer.candidates || [];
    if (layer.kept && prev.length) {
      // A selecting layer: show every incoming candidate, kept (in the layer's order, with its score) or dropped.
      // The verb says what the selection was: a verifier passes, a vote keeps the majority, a ranker keeps its top.
      const types = new Set(layer.calls.map((c) => c.type));
      const [yes, no] = types.has("verifier") ? ["passed", "did not pass"]
        : layer.votes && Object.keys(layer.votes).length ? ["in the majority", "outvoted"] : ["kept", "dropped"];
      card.append(el("div", { class: "muted", text: "incoming candidates:" }));
      prev.forEach((c, i) => {
        const rank = layer.kept.indexOf(i);
        const tags = rank >= 0
          ? [el("span", { class: "tag kept", text: `${yes} #${rank + 1}` + (cands[rank] && cands[rank].score !== null && cands[rank].score !== undefined ? ` · score ${cands[rank].score}` : "") })]
          : [el("span", { class: "tag dropped", text: no })];
        card.append(candidateItem(c, i, tags));
      });
    } else if (cands.length) {
      card.append(el("div", { class: "muted", text: "candidates out:" }));
      cands.forEach((c, i) => card.append(candidateItem(c, i, c.score !== null && c.score !== undefined ? [el("span", { class: "tag", text: `score ${c.score}` })] : [])));
    }
    if (failedCalls.length) {
      const ul = el("ul");
      for (const c of failedCalls) ul.append(el("li", { class: "failure", text: `call #${c.id} ${c.component} → ${c.model}: ${c.status || "error"}: ${c.error || ""}` }));
      card.append(ul);
    }
    box.append(card);
    if (cands.length) prev = cands;
  });
}
function showTrace(item, switchTab = true) {
  shownTrace = item;
  const tr = item.trace;
  $("#tr-empty").hidden = true; $("#tr-view").hidden = false; $("#tr-download").disabled = false;
  const u = tr.usage || {};
  const sum = $("#tr-summary"); sum.textContent = "";
  const cell = (k, v, cls) => el("div", { class: cls || "" }, el("b", { text: k }), el("span", { text: v }));
  const nCalls = tr.layers.reduce((a, l) => a + l.calls.length, 0);
  sum.append(cell("architecture", tr.architecture), cell("request", item.id || "(from file)"),
    cell("status", item.status === "error" ? `failed${item.http_status ? " (" + item.http_status + ")" : ""}` : "ok", item.status === "error" ? "failed" : ""),
    cell("latency", fmtS(tr.latency_s)), cell("backend calls", `${tr.calls}` + (tr.calls !== nCalls ? ` (${nCalls} logical)` : "")),
    cell("tokens", `${fmtN(u.prompt_tokens)} prompt + ${fmtN(u.completion_tokens)} completion = ${fmtN(u.total_tokens)}`));
  if (item.prompt) sum.append(cell("prompt", item.prompt.slice(0, 160)));
  if (item.error) sum.append(cell("error", item.error, "failed"));
  sum.dataset.calls = tr.calls;
  drawLayers($("#tr-layers"), tr);
  if (switchTab) selectTab("trace");  // draws the waterfall at the tab's width
  else drawWaterfall($("#tr-waterfall"), tr);
}
function downloadTrace() {
  if (!shownTrace) return;
  const blob = new Blob([JSON.stringify(shownTrace, null, 2)], { type: "application/json" });
  const a = el("a", { href: URL.createObjectURL(blob), download: `${shownTrace.id || "trace"}.json` });
  document.body.append(a); a.click(); a.remove();
}
async function loadFile(file) {
  const st = $("#tr-status");
  try {
    const items = parseTraceFile(await file.text());
    if (!items.length) throw new Error("no trace in this file (expected a trace, a response with `trace`, or JSON lines of them)");
    pickerItems = items;
    const pick = $("#tr-pick");
    pick.hidden = items.length < 2; pick.textContent = "";
    items.forEach((it, i) => pick.append(el("option", { value: i, text: `${i + 1}: ${it.trace.architecture} · ${(it.prompt || it.id || "").slice(0, 60)}` })));
    st.className = "status ok"; st.textContent = `${file.name}: ${items.length} trace(s)`;
    showTrace(items[0]);
  } catch (e) { st.className = "status bad"; st.textContent = `${file.name}: ${e.message}`; }
}

// ---------------------------------------------------------------- recent requests
// Refreshes overlap (a finished request and a tab switch each start one); only the latest may draw, so an older
// answer that arrives last never replaces a newer list.
let recentSeq = 0;
async function refreshRecent() {
  const st = $("#rc-status"), body = $("#rc-table tbody"), seq = ++recentSeq;
  try {
    const r = await getJSON("/v1/traces");
    if (seq !== recentSeq) return;
    body.textContent = "";
    st.className = "status";
    st.textContent = r.keep_traces === 0 ? "The server keeps no traces (server.keep_traces: 0)." : `${r.data.length} request(s), the server keeps the last ${r.keep_traces}`;
    for (const t of r.data) {
      const tr = el("tr", { "data-id": t.id, onclick: () => openStored(t.id) },
        el("td", { text: new Date(t.created * 1000).toLocaleTimeString() }), el("td", { text: t.model }),
        el("td", { class: t.status === "ok" ? "" : "failure", text: t.status === "ok" ? "ok" : `failed (${t.http_status})` }),
        el("td", { text: fmtS(t.latency_s) }), el("td", { text: fmtN(t.calls) }), el("td", { text: fmtN(t.total_tokens) }),
        el("td", { class: "prompt", text: t.prompt, title: t.error || t.prompt }));
      body.append(tr);
    }
  } catch (e) { if (seq === recentSeq) { st.className = "status bad"; st.textContent = e.message; } }
}
async function openStored(id) {
  try { showTrace(await getJSON("/v1/traces/" + encodeURIComponent(id))); }
  catch (e) { banner(e.message); }
}

// ---------------------------------------------------------------- compare
async function compare() {
  const prompt = $("#cmp-prompt").value.trim(), st = $("#cmp-status"), box = $("#cmp-results");
  const models = [...new Set($$(".cmp-model").map((s) => s.value).filter(Boolean))];
  if (!prompt || !models.length) { st.className = "status bad"; st.textContent = "need a prompt and at least one architecture"; return; }
  box.textContent = ""; st.className = "status"; st.textContent = `running ${models.length} side by side…`; banner(null);
  $("#cmp-send").disabled = true;
  const maxTokens = Number($("#cmp-max_tokens").value) || undefined;
  const runs = models.map(async (model) => {
    const ans = el("div", { class: "answer" }), stats = el("table"), col = el("div", { class: "cmp-col", "data-model": model }, el("h3", { text: model }), ans, stats);
    box.append(col);
    const t0 = performance.now();
    let final = null;
    try {
      const id = await streamChat({ model, messages: [{ role: "user", content: prompt }], stream: true, max_tokens: maxTokens,
        stream_options: { include_usage: true }, return_trace: true }, (kind, p) => { if (kind === "text") ans.textContent += p; else if (kind === "final") final = p; });
      const secs = (performance.now() - t0) / 1000, tr = final && final.trace;
      const row = (k, v) => stats.append(el("tr", {}, el("td", { class: "muted", text: k }), el("td", { text: v })));
      row("latency", fmtS(secs));
      if (tr) {
        row("backend calls", String(tr.calls));
        row("tokens", `${fmtN(tr.usage.prompt_tokens)} prompt + ${fmtN(tr.usage.completion_tokens)} completion`);
        col.append(el("button", { text: "open trace", onclick: () => showTrace({ id, model, status: "ok", prompt, trace: tr }) }));
      }
      col.dataset.done = "1";
    } catch (e) { ans.classList.add("bad-text"); ans.textContent = e.message; col.dataset.done = "error"; }
  });
  await Promise.allSettled(runs);
  st.className = "status ok"; st.textContent = "done"; $("#cmp-send").disabled = false;
  refreshRecent();
}

// ---------------------------------------------------------------- tabs and wiring
function selectTab(name) {
  $$("#tabs button").forEach((b) => b.classList.toggle("active", b.dataset.tab === name));
  $$(".tab").forEach((t) => t.classList.toggle("active", t.id === "tab-" + name));
  if (name === "recent") refreshRecent();
  if (name === "trace" && shownTrace) drawWaterfall($("#tr-waterfall"), shownTrace.trace);
}
window.addEventListener("DOMContentLoaded", () => {
  $$("#tabs button").forEach((b) => b.addEventListener("click", () => selectTab(b.dataset.tab)));
  $("#key-button").addEventListener("click", () => askKey());
  $("#pg-model").addEventListener("change", loadYaml);
  $("#pg-yaml").addEventListener("input", validateYaml);
  $("#pg-send").addEventListener("click", send);
  $("#pg-prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) send(); });
  $("#pg-stop-btn").addEventListener("click", () => running && running.abort());
  $("#pg-open-trace").addEventListener("click", () => lastTrace && showTrace(lastTrace));
  $("#tr-download").addEventListener("click", downloadTrace);
  $("#tr-file").addEventListener("change", (e) => e.target.files[0] && loadFile(e.target.files[0]));
  $("#tr-pick").addEventListener("change", (e) => showTrace(pickerItems[Number(e.target.value)]));
  $("#rc-refresh").addEventListener("click", refreshRecent);
  $("#cmp-send").addEventListener("click", compare);
  boot();
});
