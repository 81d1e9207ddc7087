// berth's node page: reads the agent's API with the caller's credential
// (a token kept in this tab's session storage and sent as the
// Authorization header, or the browser's client certificate) and follows
// the event stream to stay current. Data only ever reaches the page as
// text (textContent), never as markup.
"use strict";

const TOKEN_KEY = "berth.token";
const MAX_EVENTS = 200;

// Unauthorized is thrown when the agent wants a credential (401).
class Unauthorized extends Error {}

// Forbidden is thrown when the credential's role may not read a route (403).
class Forbidden extends Error {}

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

function headers(extra) {
  const h = Object.assign({}, extra);
  const t = token();
  if (t) h.Authorization = "Bearer " + t;
  return h;
}

async function problemText(resp) {
  try {
    const p = await resp.json();
    return p.detail || p.title || resp.statusText;
  } catch (e) {
    return resp.statusText;
  }
}

// api fetches a JSON document of the API.
async function api(path, signal) {
  const resp = await fetch(path, { headers: headers({ Accept: "application/json" }), credentials: "same-origin", signal });
  if (resp.status === 401) throw new Unauthorized(await problemText(resp));
  if (resp.status === 403) throw new Forbidden(await problemText(resp));
  if (!resp.ok) throw new Error(resp.status + " " + (await problemText(resp)));
  return resp.json();
}

// stream reads a streaming answer (server-sent events, NDJSON) and hands
// each complete record (split at sep) to onRecord, until it ends.
async function stream(path, sep, onRecord, signal) {
  const resp = await fetch(path, { headers: headers({}), credentials: "same-origin", signal, cache: "no-store" });
  if (resp.status === 401) throw new Unauthorized(await problemText(resp));
  if (resp.status === 403) throw new Forbidden(await problemText(resp));
  if (!resp.ok) throw new Error(resp.status + " " + (await problemText(resp)));
  const reader = resp.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf(sep)) >= 0) {
      const rec = buf.slice(0, i);
      buf = buf.slice(i + sep.length);
      onRecord(rec);
    }
  }
  if (buf.trim() !== "") onRecord(buf);
}

// parseSSE turns one server-sent event block into {id, type, data}, or
// null for a comment.
function parseSSE(block) {
  const ev = { id: "", type: "", data: "" };
  for (const line of block.split("\n")) {
    if (line.startsWith(":")) continue;
    const i = line.indexOf(":");
    const field = i < 0 ? line : line.slice(0, i);
    const value = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
    if (field === "id") ev.id = value;
    else if (field === "event") ev.type = value;
    else if (field === "data") ev.data += value;
  }
  return ev.data === "" ? null : ev;
}

// el makes an element with text content and attributes.
function el(tag, text, attrs) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}

function $(id) {
  return document.getElementById(id);
}

function facts(dl, pairs) {
  dl.replaceChildren();
  for (const [k, v] of pairs) {
    if (v === undefined || v === null || v === "") continue;
    dl.append(el("dt", k));
    const dd = el("dd");
    if (v instanceof Node) dd.append(v);
    else dd.textContent = String(v);
    dl.append(dd);
  }
}

function note(id, text) {
  const p = $(id);
  p.textContent = text || "";
  p.hidden = !text;
}

function ago(iso) {
  if (!iso) return "";
  const t = new Date(iso);
  return t.toLocaleString();
}

function round(x, digits) {
  const f = Math.pow(10, digits);
  return Math.round(x * f) / f;
}

function setConn(state, text) {
  const c = $("conn");
  c.className = "conn " + state;
  c.textContent = text;
}

// --- authentication -------------------------------------------------------

let stopAll = () => {};

function showLogin(message) {
  stopAll();
  $("main").hidden = true;
  $("login").hidden = false;
  $("forget").hidden = !token();
  $("login-msg").textContent = token()
    ? "The agent refused the token this tab holds (401): " + message
    : "This agent answers only requests with a credential (401). Enter a token, or load the page with a client certificate the agent knows.";
  setConn("down", "not signed in");
  $("token").focus();
}

function showMain() {
  $("login").hidden = true;
  $("main").hidden = false;
  $("forget").hidden = !token();
}

function setupLogin(start) {
  $("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const t = $("token").value.trim();
    $("token").value = "";
    if (t) sessionStorage.setItem(TOKEN_KEY, t);
    start();
  });
  $("forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    start();
  });
}

// handle reports err where it belongs: a 401 brings the prompt back.
function handle(err, noteId, what) {
  if (err instanceof Unauthorized) {
    showLogin(err.message);
    return;
  }
  if (err && err.name === "AbortError") return;
  if (err instanceof Forbidden) {
    note(noteId, "This credential's role may not read " + what + " (403).");
    return;
  }
  note(noteId, "Could not read " + what + ": " + err.message);
}

// --- the node page --------------------------------------------------------

function meterRow(box, label, used, total, fmt) {
  box.append(el("span", label));
  const m = el("meter", null, { min: "0", max: String(total > 0 ? total : 1), value: String(used), high: String(total * 0.9), optimum: "0" });
  m.title = label + ": " + fmt(used) + " of " + fmt(total);
  box.append(m);
  box.append(el("span", fmt(used) + " / " + fmt(total)));
}

function amount(r) {
  if (!r) return "";
  const mem = r.memory_mb >= 1024 ? round(r.memory_mb / 1024, 1) + " GiB" : (r.memory_mb || 0) + " MiB";
  return round(r.cpu || 0, 2) + " cores, " + mem;
}

function renderNode(n) {
  $("node-name").textContent = n.hostname;
  document.title = "berth: " + n.hostname;
  facts($("node-facts"), [
    ["Node", n.id],
    ["Version", n.version],
    ["Up since", ago(n.started_at)],
    ["Schedulable", n.schedulable === false ? "no (cordoned" + (n.cordon && n.cordon.reason ? ": " + n.cordon.reason : "") + ")" : "yes"],
    ["Workloads", n.workloads ? n.workloads.total : ""],
    ["Capacity", amount(n.capacity)],
    ["Reserved", amount(n.reserved)],
    ["Limits", n.limited ? amount(n.limited) + " (may exceed allocatable)" : ""],
    ["Index", n.index],
  ]);
  const bars = $("bars");
  bars.replaceChildren();
  const a = n.allocated || {}, t = n.allocatable || {};
  meterRow(bars, "CPU (cores)", a.cpu || 0, t.cpu || 0, (x) => String(round(x, 2)));
  meterRow(bars, "Memory", a.memory_mb || 0, t.memory_mb || 0, (x) => (x >= 1024 ? round(x / 1024, 1) + " GiB" : x + " MiB"));
  if (t.workloads) meterRow(bars, "Workloads", a.workloads || 0, t.workloads, (x) => String(x));
  const conds = $("conditions");
  conds.replaceChildren();
  for (const c of n.conditions || []) {
    // Pressure conditions are good when false; the rest when true.
    const good = /Pressure$/.test(c.type) ? !c.status : c.status;
    const chip = el("span", c.type + ": " + (c.status ? "true" : "false"), { class: "cond " + (good ? "good" : "bad") });
    chip.title = c.reason + (c.message ? ": " + c.message : "");
    conds.append(chip);
  }
  const body = $("drivers-body");
  body.replaceChildren();
  for (const name of Object.keys(n.drivers || {}).sort()) {
    const d = n.drivers[name];
    const tr = el("tr", null, { "data-driver": name });
    tr.append(el("td", name));
    tr.append(el("td", d.healthy ? "healthy" : "unhealthy", { class: d.healthy ? "ok" : "bad" }));
    tr.append(el("td", d.version || ""));
    tr.append(el("td", (d.details && d.details.accel) || ""));
    tr.append(el("td", d.reason || ""));
    tr.append(el("td", d.last_error ? d.last_error + (d.last_error_at ? " (" + ago(d.last_error_at) + ")" : "") : ""));
    body.append(tr);
  }
  const p = n.policy || {};
  facts($("policy-facts"), [
    ["Version", p.version],
    ["Source", p.source],
    ["Last reload", p.last_reload_error ? "rejected at " + ago(p.last_reload_error.at) : "ok"],
  ]);
  const perr = $("policy-error");
  perr.hidden = !p.last_reload_error;
  perr.textContent = p.last_reload_error ? p.last_reload_error.message : "";
}

function workloadHealth(w) {
  if (w.health) return typeof w.health === "string" ? w.health : w.health.status || JSON.stringify(w.health);
  if (w.deleting) return "deleting";
  if (w.state === "failed") return w.error || "failed";
  if (w.oom_killed) return "OOM-killed";
  if (w.state === "exited") return "exit " + w.exit_code;
  if (w.restart_count > 0) return w.restart_count + " restarts (last exit " + w.last_exit_code + ")";
  if (w.error) return w.error;
  return w.state === "running" ? "ok" : "";
}

function renderWorkloads(list) {
  const body = $("workloads-body");
  body.replaceChildren();
  const ws = (list.workloads || []).slice().sort((x, y) => (x.created_at < y.created_at ? 1 : -1));
  $("workloads-count").textContent = "(" + ws.length + ")";
  for (const w of ws) {
    const ref = w.tenant ? w.tenant + "/" + (w.name || w.id) : w.name || w.id;
    const tr = el("tr", null, { "data-id": w.id });
    const name = el("td");
    name.append(el("a", ref, { href: "/workloads/" + encodeURIComponent(w.id) }));
    tr.append(name);
    tr.append(el("td", w.id, { class: "id" }));
    tr.append(el("td", w.state, { class: "state " + w.state }));
    tr.append(el("td", w.isolation));
    const pl = w.placement || {};
    tr.append(el("td", pl.deciding_rule ? pl.deciding_rule : pl.explanation || "", { title: pl.explanation || "" }));
    tr.append(el("td", workloadHealth(w), { class: "health" }));
    const net = w.network || {};
    tr.append(el("td", net.address || (net.mode && net.mode !== "bridge" ? net.mode : "")));
    tr.append(el("td", ago(w.created_at)));
    body.append(tr);
  }
  note("workloads-note", ws.length ? "" : "No workloads.");
}

function addEvent(e, list) {
  const li = el("li", null, { "data-event-id": String(e.id) });
  li.append(el("span", new Date(e.time).toLocaleTimeString() + " "));
  li.append(el("span", e.type, { class: "type" }));
  if (e.workload_id) {
    li.append(" ");
    li.append(el("a", e.workload_id, { href: "/workloads/" + encodeURIComponent(e.workload_id) }));
  }
  li.append(el("span", " " + e.message));
  list.prepend(li);
  while (list.children.length > MAX_EVENTS) list.lastChild.remove();
}

function nodePage() {
  let ctrl = null;
  let timer = null;

  async function refreshNode(signal) {
    try {
      renderNode(await api("/v1/node", signal));
      note("node-note", "");
    } catch (err) {
      handle(err, "node-note", "the node's status");
    }
  }
  async function refreshWorkloads(signal) {
    try {
      renderWorkloads(await api("/v1/workloads", signal));
    } catch (err) {
      handle(err, "workloads-note", "workloads");
    }
  }

  async function follow(signal) {
    // since=1: the events the agent still holds, then new ones.
    let last = "1";
    const list = $("events-list");
    list.replaceChildren();
    let pending = null;
    const schedule = (what) => {
      // Bursts of events become one refresh.
      if (pending) {
        pending.add(what);
        return;
      }
      pending = new Set([what]);
      setTimeout(() => {
        const p = pending;
        pending = null;
        if (p.has("node")) refreshNode(signal);
        if (p.has("workloads")) refreshWorkloads(signal);
      }, 100);
    };
    for (;;) {
      try {
        setConn("live", "live");
        await stream("/v1/events?since=" + encodeURIComponent(last), "\n\n", (block) => {
          const ev = parseSSE(block);
          if (!ev) return;
          last = ev.id || last;
          const e = JSON.parse(ev.data);
          addEvent(e, list);
          schedule("node");
          if (e.workload_id) schedule("workloads");
        }, signal);
      } catch (err) {
        if (err instanceof Unauthorized || err instanceof Forbidden || (err && err.name === "AbortError")) {
          handle(err, "events-note", "events");
          return;
        }
      }
      if (signal.aborted) return;
      setConn("down", "reconnecting");
      await new Promise((r) => setTimeout(r, 2000));
      if (signal.aborted) return;
      refreshNode(signal);
      refreshWorkloads(signal);
    }
  }

  function start() {
    stopAll();
    showMain();
    ctrl = new AbortController();
    const signal = ctrl.signal;
    stopAll = () => {
      ctrl.abort();
      clearInterval(timer);
    };
    refreshNode(signal);
    refreshWorkloads(signal);
    follow(signal);
    // Uptime and ages move without events.
    timer = setInterval(() => refreshNode(signal), 30000);
  }
  setupLogin(start);
  start();
}

// --- a workload's page ----------------------------------------------------

function renderWorkload(w) {
  const ref = w.tenant ? w.tenant + "/" + (w.name || w.id) : w.name || w.id;
  $("workload-name").textContent = ref;
  document.title = "berth: " + ref;
  const state = el("span", w.state, { class: "state " + w.state });
  facts($("workload-facts"), [
    ["ID", w.id],
    ["State", state],
    ["Health", workloadHealth(w)],
    ["Isolation", w.isolation],
    ["Image", w.spec && w.spec.image],
    ["Command", w.spec && [].concat(w.spec.command || [], w.spec.args || []).join(" ")],
    ["Address", w.network && w.network.address],
    ["Exit code", w.exit_code],
    ["Error", w.error],
    ["Restarts", w.restart_count],
    ["Created", ago(w.created_at)],
    ["Started", ago(w.started_at)],
    ["Finished", ago(w.finished_at)],
  ]);
  const p = w.placement || {};
  facts($("placement-facts"), [
    ["Isolation", p.isolation],
    ["Deciding rule", p.deciding_rule || "(the policy's default)"],
    ["Policy version", p.policy_version],
    ["Network", p.network],
  ]);
  $("placement-explanation").textContent = p.explanation || "";
  const body = $("matched-body");
  body.replaceChildren();
  for (const m of p.matched || []) {
    const tr = el("tr");
    tr.append(el("td", m.rule), el("td", m.outcome), el("td", m.reason));
    body.append(tr);
  }
}

function workloadPage() {
  const ref = decodeURIComponent(location.pathname.replace(/^\/workloads\//, ""));
  const path = "/v1/workloads/" + encodeURIComponent(ref);
  let ctrl = null;

  async function refresh(signal) {
    try {
      const w = await api(path, signal);
      renderWorkload(w);
      note("workload-note", "");
      return w;
    } catch (err) {
      handle(err, "workload-note", "this workload");
      return null;
    }
  }

  async function followLogs(signal) {
    const pre = $("log-lines");
    pre.replaceChildren();
    $("logs-state").textContent = "(following)";
    try {
      await stream(path + "/logs?follow=true&format=ndjson&tail=1000", "\n", (line) => {
        if (line.trim() === "") return;
        const l = JSON.parse(line);
        const stick = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
        pre.append(el("span", l.line + "\n", { class: l.stream }));
        if (stick) pre.scrollTop = pre.scrollHeight;
      }, signal);
      $("logs-state").textContent = "(ended)";
    } catch (err) {
      $("logs-state").textContent = "";
      handle(err, "workload-note", "this workload's logs");
    }
  }

  async function followEvents(signal, id) {
    for (;;) {
      try {
        setConn("live", "live");
        await stream("/v1/events?workload=" + encodeURIComponent(id), "\n\n", (block) => {
          if (parseSSE(block)) refresh(signal);
        }, signal);
      } catch (err) {
        if (err instanceof Unauthorized || err instanceof Forbidden || (err && err.name === "AbortError")) {
          handle(err, "workload-note", "this workload's events");
          return;
        }
      }
      if (signal.aborted) return;
      setConn("down", "reconnecting");
      await new Promise((r) => setTimeout(r, 2000));
      if (signal.aborted) return;
      refresh(signal);
    }
  }

  async function start() {
    stopAll();
    showMain();
    ctrl = new AbortController();
    const signal = ctrl.signal;
    stopAll = () => ctrl.abort();
    const w = await refresh(signal);
    if (!w) return;
    followLogs(signal);
    followEvents(signal, w.id);
  }
  setupLogin(start);
  start();
}

if (document.body.dataset.page === "workload") workloadPage();
else nodePage();
