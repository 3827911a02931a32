// Warren dashboard: polls the tracker's JSON API every 2 s and draws the
// page with DOM calls only (every value is set as text, never as HTML).
"use strict";

const POLL_MS = 2000;
const HISTORY = 150; // samples kept for the chart: 5 minutes
const STATES = ["scheduled", "started", "failed", "succeeded", "dead", "cancelled", "duplicate"];
const COLORS = {
  scheduled: "#7a5cd6", started: "#2f6fde", failed: "#c77800",
  succeeded: "#2a7a3b", dead: "#c62f2f", cancelled: "#6b7480", duplicate: "#8a7a3a",
};
const samples = [];
let shownTask = null;
let shownWorkflow = null;
// Who is logged in: {user, role, auth, csrf} from /api/session.
let session = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null) node.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

// Fetches JSON with the session cookie; a state-changing request carries the
// session's CSRF token. A 401 means the session ended: back to the login page.
async function getJSON(path, options) {
  const opts = Object.assign({ credentials: "same-origin" }, options || {});
  if (opts.method && opts.method !== "GET" && session && session.csrf) {
    opts.headers = Object.assign({ "x-csrf-token": session.csrf }, opts.headers || {});
  }
  const res = await fetch(path, opts);
  let body = null;
  try { body = await res.json(); } catch (_) { /* not JSON */ }
  if (res.status === 401) { location.assign("/login"); }
  if (!res.ok) throw new Error((body && body.error) || `${path}: HTTP ${res.status}`);
  return body;
}

async function loadSession() {
  try {
    session = await getJSON("/api/session");
  } catch (e) {
    return;
  }
  if (session.auth === "session") {
    document.getElementById("user").textContent = `${session.user} (${session.role})`;
    document.getElementById("logout-csrf").value = session.csrf;
    document.getElementById("logout").hidden = false;
  }
}
function isAdmin() { return !session || session.role === "admin"; }

function rate(x) { return x ? x.toFixed(1) : "0"; }
function when(t) { return t ? t.replace("T", " ").replace("Z", "") : ""; }
function errorText(e) {
  if (!e) return "";
  if (typeof e === "string") return e;
  return [e.code, e.message].filter(Boolean).join(": ");
}
function fill(tbody, rows, cols, empty) {
  tbody.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: cols, class: "muted" }, empty))]));
}
function taskLink(id) {
  return el("a", { href: `?task=${encodeURIComponent(id)}`, class: "mono", onclick: (ev) => { ev.preventDefault(); showTask(id); } }, id);
}
function workflowLink(id) {
  return el("a", { href: `?workflow=${encodeURIComponent(id)}`, class: "mono workflow-link",
    onclick: (ev) => { ev.preventDefault(); showWorkflow(id); } }, id);
}
// The address names what is open (?task=…&workflow=…), so it can be shared.
function syncAddress() {
  const q = new URLSearchParams();
  if (shownTask) q.set("task", shownTask);
  if (shownWorkflow) q.set("workflow", shownWorkflow);
  const qs = q.toString();
  window.history.replaceState(null, "", qs ? `?${qs}` : location.pathname);
}

async function refreshQueues() {
  const tbody = document.querySelector("#queues tbody");
  const err = document.getElementById("queues-error");
  try {
    const { queues } = await getJSON("/api/queues");
    const { paused } = await getJSON("/api/paused");
    const pausedQueues = new Set(paused.filter((p) => p.kind === "queue").map((p) => p.name));
    // Work queues first, then the internal ones (grouped by kind).
    const rank = (q) => (q.kind === "work" ? 0 : 1);
    const shown = queues.filter((q) => q.kind !== "delay" || !/\.wait\.\d+s$/.test(q.name))
      .sort((a, b) => rank(a) - rank(b) || a.kind.localeCompare(b.kind) || a.name.localeCompare(b.name));
    const tiers = queues.filter((q) => q.kind === "delay" && /\.wait\.\d+s$/.test(q.name));
    const workShort = (q) => (q.kind === "work" && q.short && q.name.endsWith(`.q.${q.short}`) ? q.short : null);
    const rows = shown.map((q) => el("tr", { "data-queue": q.name },
      el("td", { class: "mono" }, q.name,
        q.kind === "work" && pausedQueues.has(q.short) ? el("span", { class: "pill bad paused" }, "paused") : null,
        workShort(q) && isAdmin() ? pauseButton("queue", q.short, pausedQueues.has(q.short)) : null),
      el("td", {}, q.kind),
      el("td", { class: "num" }, q.ready), el("td", { class: "num" }, q.unacked),
      el("td", { class: "num" }, q.consumers), el("td", { class: "num" }, rate(q.publish_rate)),
      el("td", { class: "num" }, rate(q.deliver_rate)), el("td", { class: "num" }, rate(q.ack_rate))));
    const firstInternal = shown.findIndex((q) => rank(q) > 0);
    if (firstInternal >= 0) {
      rows.splice(firstInternal, 0, el("tr", { class: "group" }, el("td", { colspan: 8, class: "muted" }, "internal queues")));
    }
    fillQueueFilter(queues.filter((q) => workShort(q)).map((q) => q.short));
    recordDepths(queues);
    if (tiers.length) {
      const sum = (k) => tiers.reduce((a, q) => a + (q[k] || 0), 0);
      rows.push(el("tr", { "data-queue": "delay-tiers" },
        el("td", { class: "mono" }, `delay tiers (${tiers.length} queues)`), el("td", {}, "delay"),
        el("td", { class: "num" }, sum("ready")), el("td", { class: "num" }, sum("unacked")),
        el("td", { class: "num" }, sum("consumers")), el("td", { class: "num" }, rate(sum("publish_rate"))),
        el("td", { class: "num" }, rate(sum("deliver_rate"))), el("td", { class: "num" }, rate(sum("ack_rate")))));
    }
    fill(tbody, rows, 8, "no queues");
    const types = paused.filter((p) => p.kind === "type");
    document.getElementById("paused-types").replaceChildren(...(types.length
      ? [document.createTextNode("paused task types: "), ...types.map((p) => el("span", { class: "paused-type", "data-type": p.name },
        el("code", {}, p.name), ` since ${when(p.since)} `, isAdmin() ? pauseButton("type", p.name, true) : null))]
      : []));
    err.hidden = true;
  } catch (e) {
    err.textContent = `queues unavailable: ${e.message}`;
    err.hidden = false;
  }
}

async function refreshStats() {
  const pill = document.getElementById("status");
  try {
    const s = await getJSON("/api/stats");
    pill.textContent = s.consuming ? "tracking" : "broker unreachable";
    pill.className = "pill " + (s.consuming ? "ok" : "bad");
    samples.push({ t: Date.now(), states: s.states });
    if (samples.length > HISTORY) samples.shift();
    const counts = document.getElementById("state-counts");
    counts.replaceChildren(el("span", { class: "count", "data-state": "total" }, "total ", el("b", {}, s.tasks)),
      ...STATES.map((st) => el("span", { class: `count state-${st}`, "data-state": st }, `${st} `, el("b", {}, s.states[st] || 0))));
    drawChart();
  } catch (e) {
    pill.textContent = "tracker unreachable";
    pill.className = "pill bad";
  }
}

function drawChart() {
  const svg = document.getElementById("chart");
  const ns = "http://www.w3.org/2000/svg";
  const W = 800, H = 200, pad = 4;
  const max = Math.max(1, ...samples.flatMap((h) => STATES.map((s) => h.states[s] || 0)));
  const x = (i) => (samples.length < 2 ? W / 2 : pad + (i * (W - 2 * pad)) / (samples.length - 1));
  const y = (v) => H - pad - (v * (H - 2 * pad)) / max;
  const nodes = [];
  for (const st of STATES) {
    if (!samples.some((h) => h.states[st])) continue;
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("points", samples.map((h, i) => `${x(i).toFixed(1)},${y(h.states[st] || 0).toFixed(1)}`).join(" "));
    line.setAttribute("fill", "none");
    line.setAttribute("stroke", COLORS[st]);
    line.setAttribute("stroke-width", "2");
    line.setAttribute("vector-effect", "non-scaling-stroke");
    line.setAttribute("data-state", st);
    nodes.push(line);
  }
  const label = document.createElementNS(ns, "text");
  label.setAttribute("x", "6"); label.setAttribute("y", "14"); label.setAttribute("font-size", "12"); label.setAttribute("fill", "#6b7480");
  label.textContent = `max ${max}`;
  nodes.push(label);
  svg.replaceChildren(...nodes);
  document.getElementById("legend").replaceChildren(...STATES.map((st) =>
    el("span", {}, el("span", { class: "swatch", style: `background:${COLORS[st]}` }), st)));
}

async function refreshFailures() {
  const tbody = document.querySelector("#failures tbody");
  try {
    const { tasks } = await getJSON("/api/failures?limit=15");
    fill(tbody, tasks.map((t) => el("tr", { "data-task": t.task_id },
      el("td", { class: "mono" }, when(t.last_event_at)), el("td", {}, taskLink(t.task_id)), el("td", {}, t.type),
      el("td", { class: `state-${t.state}` }, t.state), el("td", { class: "num" }, t.attempts),
      el("td", { class: "error" }, errorText(t.error)))), 6, "no failures");
  } catch (e) {
    fill(tbody, [], 6, `failures unavailable: ${e.message}`);
  }
}

// A button that pauses (or resumes) a work queue or task type fleet-wide,
// after a confirmation.
function pauseButton(kind, name, paused) {
  const verb = paused ? "Resume" : "Pause";
  return el("button", { type: "button", class: "pause", "data-kind": kind, "data-name": name, onclick: async (ev) => {
    const button = ev.target;
    if (!(await ask(`${verb} ${kind} ${name} on every worker?`))) return;
    button.disabled = true;
    const err = document.getElementById("queues-error");
    try {
      await getJSON("/api/pause", {
        method: "POST", headers: { "content-type": "application/json" },
        body: JSON.stringify({ kind, name, paused: !paused }),
      });
    } catch (e) {
      err.textContent = `${verb.toLowerCase()} failed: ${e.message}`;
      err.hidden = false;
    }
    refreshQueues();
    refreshActions();
  } }, verb);
}

async function replay(id, button) {
  if (!(await ask(`Replay dead task ${id}? It is published again with its attempts reset.`))) return;
  button.disabled = true;
  const msg = document.getElementById("dead-message");
  try {
    const r = await getJSON("/api/dead/replay", {
      method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ ids: [id] }),
    });
    msg.textContent = r.replayed ? `replayed ${id}` : `${id} was no longer in the dead-letter queue`;
  } catch (e) {
    msg.textContent = `replay failed: ${e.message}`;
    button.disabled = false;
  }
  msg.hidden = false;
  refreshDead();
  refreshActions();
}

async function refreshDead() {
  const tbody = document.querySelector("#dead tbody");
  try {
    const d = await getJSON("/api/dead?limit=20");
    document.getElementById("dead-depth").textContent = `${d.queue}: ${d.depth}`;
    fill(tbody, d.tasks.map((t) => el("tr", { "data-dead": t.id || "" },
      el("td", {}, t.id ? taskLink(t.id) : "-"), el("td", {}, t.type || "-"), el("td", {}, t.reason || "-"),
      el("td", { class: "num" }, t.attempt ?? "-"), el("td", { class: "error" }, t.detail || ""),
      el("td", {}, t.id && isAdmin() ? el("button", { type: "button", class: "replay", onclick: (ev) => replay(t.id, ev.target) }, "Replay") : ""))),
      6, "no dead tasks");
  } catch (e) {
    fill(tbody, [], 6, `dead letters unavailable: ${e.message}`);
  }
}

async function showTask(id) {
  id = (id || "").trim();
  if (!id) return;
  const panel = document.getElementById("task-panel");
  const body = document.getElementById("task-body");
  document.getElementById("task-title").textContent = id;
  const fresh = shownTask !== id;
  shownTask = id;
  if (fresh) {
    document.getElementById("search-id").value = id;
    syncAddress();
  }
  panel.hidden = false;
  try {
    const { task, events } = await getJSON(`/api/tasks/${encodeURIComponent(id)}`);
    const facts = [["state", task.state], ["type", task.type], ["attempts", task.attempts], ["queue", task.queue],
      ["worker", task.worker], ["first seen", when(task.first_seen)], ["started", when(task.started_at)],
      ["finished", when(task.finished_at)], ["duration", task.duration_ms != null ? `${task.duration_ms} ms` : ""],
      ["reason", task.reason], ["error", errorText(task.error)],
      ["result", task.result != null ? JSON.stringify(task.result) : ""],
      ["workflow", task.workflow_id ? workflowLink(task.workflow_id) : ""],
      ["parent", task.parent_id ? taskLink(task.parent_id) : ""]];
    const dl = el("table", { id: "task-facts", "data-state": task.state },
      el("tbody", {}, ...facts.filter(([, v]) => v !== null && v !== undefined && v !== "")
        .map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", { class: k === "error" ? "error" : "mono" }, v)))));
    const rows = events.map((e) => el("tr", {}, el("td", { class: "mono" }, when(e.at)),
      el("td", { class: `state-${e.state}` }, e.state), el("td", { class: "num" }, e.attempt), el("td", { class: "mono" }, e.worker || ""),
      el("td", { class: "error" }, errorText(e.error) || e.reason || "")));
    const ev = el("table", { id: "task-events" },
      el("thead", {}, el("tr", {}, el("th", {}, "at"), el("th", {}, "state"), el("th", { class: "num" }, "attempt"), el("th", {}, "worker"), el("th", {}, "detail"))),
      el("tbody", {}, ...rows));
    body.replaceChildren(dl, el("h3", {}, "History"), ev);
  } catch (e) {
    body.replaceChildren(el("p", { class: "error", id: "task-missing" }, e.message));
  }
}

// A workflow (contract section 8): its counts per state, then its tasks
// (chain steps, group or chord members, callbacks) in the order the tracker
// first saw them, which for a chain is step order.
let workflowSeq = 0;
async function showWorkflow(id) {
  id = (id || "").trim();
  if (!id) return;
  const body = document.getElementById("workflow-body");
  document.getElementById("workflow-title").textContent = id;
  document.getElementById("workflow-close").hidden = false;
  const fresh = shownWorkflow !== id;
  shownWorkflow = id;
  if (fresh) {
    document.getElementById("workflow-id").value = id;
    syncAddress();
  }
  const seq = ++workflowSeq;
  try {
    const w = await getJSON(`/api/workflows/${encodeURIComponent(id)}`);
    if (seq !== workflowSeq || shownWorkflow !== id) return; // another one was asked for since
    const counts = el("div", { id: "workflow-counts", class: "counts", "data-done": w.done ? "true" : "false" },
      el("span", { class: "count", "data-state": "total" }, "total ", el("b", {}, w.total)),
      ...Object.entries(w.counts).map(([st, n]) => el("span", { class: `count state-${st}`, "data-state": st }, `${st} `, el("b", {}, n))),
      el("span", { class: w.done ? "pill ok wf-done" : "pill wf-done" }, w.done ? "done" : "in progress"));
    const rows = w.tasks.map((t, i) => el("tr", { "data-step": i + 1, "data-task": t.task_id, "data-state": t.state },
      el("td", { class: "num" }, i + 1), el("td", {}, taskLink(t.task_id)), el("td", { class: "type" }, t.type),
      el("td", { class: `state state-${t.state}` }, t.state), el("td", { class: "num attempts" }, t.attempts),
      el("td", {}, t.parent_id ? taskLink(t.parent_id) : ""), el("td", { class: "mono" }, when(t.last_event_at)),
      el("td", { class: "error" }, errorText(t.error) || t.reason || "")));
    const table = el("table", { id: "workflow-tasks" },
      el("thead", {}, el("tr", {}, el("th", { class: "num" }, "#"), el("th", {}, "task"), el("th", {}, "type"), el("th", {}, "state"),
        el("th", { class: "num" }, "attempts"), el("th", {}, "parent"), el("th", {}, "last event"), el("th", {}, "detail"))),
      el("tbody", {}, ...rows));
    const more = w.truncated ? [el("p", { class: "muted" }, `showing the first ${w.tasks.length} of ${w.total} tasks`)] : [];
    body.replaceChildren(counts, table, ...more);
  } catch (e) {
    if (seq !== workflowSeq) return;
    body.replaceChildren(el("p", { class: "error", id: "workflow-missing" }, e.message));
  }
}

// The page's own confirmation step (a modal dialog): resolves to false when
// dismissed, else true, or the number entered when `priority` asks for one.
function ask(text, priority) {
  const dlg = document.getElementById("confirm-dialog");
  const form = document.getElementById("confirm-form");
  const input = document.getElementById("confirm-priority");
  const label = document.getElementById("confirm-priority-label");
  const err = document.getElementById("confirm-error");
  document.getElementById("confirm-text").textContent = text;
  label.hidden = priority === undefined;
  input.value = priority === undefined || priority === null ? "" : String(priority);
  err.hidden = true;
  return new Promise((resolve) => {
    const done = (value) => {
      form.onsubmit = null; dlg.oncancel = null;
      document.getElementById("confirm-cancel").onclick = null;
      if (dlg.open) dlg.close();
      resolve(value);
    };
    form.onsubmit = (ev) => {
      ev.preventDefault();
      if (priority === undefined) { done(true); return; }
      const n = Number(input.value);
      if (input.value.trim() === "" || !Number.isInteger(n) || n < 0 || n > 255) {
        err.textContent = "a priority is a whole number from 0 to 255";
        err.hidden = false;
        return;
      }
      done(n);
    };
    document.getElementById("confirm-cancel").onclick = () => done(false);
    dlg.oncancel = (ev) => { ev.preventDefault(); done(false); };
    dlg.showModal();
    if (priority !== undefined) input.focus(); else document.getElementById("confirm-ok").focus();
  });
}

// Sends an action to the tracker (which records it with the user) and
// reports how it went under the waiting tasks.
async function act(what, path, body) {
  const msg = document.getElementById("action-message");
  try {
    await getJSON(path, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body || {}) });
    msg.textContent = `${what}: sent`;
    msg.className = "muted";
  } catch (e) {
    msg.textContent = `${what} refused: ${e.message}`;
    msg.className = "error";
  }
  msg.hidden = false;
  refreshWaiting();
  refreshActions();
}

const WAITING = new Set(["queued", "scheduled", "failed"]);
const ENDED = new Set(["succeeded", "dead", "cancelled", "duplicate"]);

function taskButtons(t) {
  if (!isAdmin()) return "";
  const id = t.task_id;
  const path = (verb) => `/api/tasks/${encodeURIComponent(id)}/${verb}`;
  const buttons = [];
  if (!ENDED.has(t.state)) {
    buttons.push(el("button", { type: "button", class: "act act-cancel", onclick: async () => {
      if (await ask(`Cancel task ${id} (${t.type}, ${t.state})?`)) act(`cancel ${id}`, path("cancel"));
    } }, "Cancel"));
  }
  if (WAITING.has(t.state)) {
    buttons.push(el("button", { type: "button", class: "act act-priority", onclick: async () => {
      const p = await ask(`Change the priority of task ${id} (${t.type}, now ${t.priority ?? "unknown"})?`, t.priority ?? "");
      if (p !== false) act(`priority ${p} for ${id}`, path("priority"), { priority: p });
    } }, "Priority…"));
    buttons.push(el("button", { type: "button", class: "act act-run-now", onclick: async () => {
      if (await ask(`Run task ${id} (${t.type}, ${t.state}) now?`)) act(`run now ${id}`, path("run-now"));
    } }, "Run now"));
  }
  return el("span", { class: "actions" }, ...buttons);
}

function waitingQuery() {
  const q = new URLSearchParams({ limit: "100" });
  const v = (id) => document.getElementById(id).value.trim();
  if (v("filter-state")) q.set("state", v("filter-state"));
  if (v("filter-type")) q.set("type", v("filter-type"));
  if (v("filter-queue")) q.set("queue", v("filter-queue"));
  if (v("filter-since")) q.set("since", v("filter-since"));
  return q.toString();
}

// The Limits panel: per limited type its permits, rate tokens and waiting
// tasks; the rate windows, tenant queues and unique locks when any exist.
function shortKey(k) { return k ? `${k.slice(0, 8)}…` : "(type)"; }
async function refreshLimits() {
  const tbody = document.querySelector("#limits tbody");
  const err = document.getElementById("limits-error");
  try {
    const v = await getJSON("/api/limits");
    const holders = (t) => v.permits.filter((p) => p.type === t)
      .flatMap((p) => p.permits.map((h) => `${p.key ? `${shortKey(p.key)} ` : ""}#${h.permit}${h.connection ? ` ${h.connection}` : ""}`));
    fill(tbody, v.types.map((t) => el("tr", { "data-limit-type": t.type },
      el("td", { class: "mono" }, t.type),
      el("td", { class: "num limit" }, t.concurrency_limit == null ? "" : `${t.concurrency_limit}${t.concurrency_key ? ` per ${t.concurrency_key}` : ""}`),
      el("td", { class: "num held" }, t.permits_held, t.permit_keys ? ` (${t.permit_keys} keys)` : ""),
      el("td", { class: "mono holders" }, holders(t.type).join(", ")),
      el("td", { class: "num tokens" }, t.rate_tokens_left == null ? "" : t.rate_tokens_left),
      el("td", { class: "num waiting" }, t.waiting))), 6, "no limits configured or held");
    const rate = document.getElementById("limits-rate");
    rate.hidden = !v.rate.length;
    rate.querySelector("tbody").replaceChildren(...v.rate.map((r) => el("tr", { "data-rate-type": r.type, "data-rate-key": r.key || "" },
      el("td", { class: "mono" }, r.type), el("td", { class: "mono", title: r.key || "" }, shortKey(r.key)),
      el("td", { class: "num burst" }, r.burst ?? ""), el("td", { class: "num used" }, r.used),
      el("td", { class: "num tokens" }, r.tokens_left ?? ""))));
    const ten = document.getElementById("limits-tenants");
    ten.hidden = !v.tenants.length;
    ten.querySelector("tbody").replaceChildren(...v.tenants.map((t) => el("tr", { "data-tenant-queue": t.queue },
      el("td", { class: "mono" }, t.queue), el("td", { class: "num tenants" }, t.tenants),
      el("td", { class: "num depth" }, t.depth),
      el("td", { class: "mono" }, t.top.map((d) => `${shortKey(d.tenant)} ${d.depth}`).join(", ")))));
    document.getElementById("limits-unique").textContent = v.unique.queues
      ? `unique locks held: ${v.unique.held} (${v.unique.queues} lock queues)` : "";
    const notes = [];
    if (v.error) notes.push(`broker side unavailable: ${v.error}`);
    if (v.truncated.length) notes.push(`more than shown: ${v.truncated.join(", ")}`);
    err.textContent = notes.join("; ");
    err.hidden = !notes.length;
  } catch (e) {
    fill(tbody, [], 6, `limits unavailable: ${e.message}`);
  }
}

let waitingSeq = 0;
async function refreshWaiting() {
  const tbody = document.querySelector("#waiting tbody");
  const seq = ++waitingSeq;
  try {
    const { tasks } = await getJSON(`/api/tasks?${waitingQuery()}`);
    if (seq !== waitingSeq) return; // a newer filter answered first
    document.getElementById("waiting-count").textContent = `${tasks.length}${tasks.length === 100 ? "+" : ""}`;
    fill(tbody, tasks.map((t) => el("tr", { "data-waiting": t.task_id, "data-state": t.state },
      el("td", {}, taskLink(t.task_id)), el("td", {}, t.type), el("td", {}, t.queue || ""),
      el("td", { class: `state-${t.state}` }, t.state === "scheduled" ? "delayed" : t.state),
      el("td", { class: "num" }, t.priority ?? ""), el("td", { class: "mono" }, when(t.due_at)),
      el("td", { class: "mono" }, when(t.last_event_at)), el("td", {}, taskButtons(t)))), 8, "no tasks match");
  } catch (e) {
    fill(tbody, [], 8, `tasks unavailable: ${e.message}`);
  }
}

function fillQueueFilter(names) {
  const select = document.getElementById("filter-queue");
  const have = new Set([...select.options].map((o) => o.value));
  for (const n of names) if (!have.has(n)) select.append(el("option", { value: n }, n));
}

async function refreshActions() {
  const tbody = document.querySelector("#actions tbody");
  try {
    const { actions } = await getJSON("/api/actions?limit=20");
    fill(tbody, actions.map((a) => el("tr", { "data-action": a.id, "data-target": a.target, class: a.ok ? "" : "refused" },
      el("td", { class: "mono" }, when(a.at)), el("td", { class: "actor" }, a.actor), el("td", { class: "verb" }, a.action),
      el("td", { class: "mono" }, a.target), el("td", { class: "mono" }, Object.keys(a.detail || {}).length ? JSON.stringify(a.detail) : ""),
      el("td", { class: a.ok ? "outcome" : "outcome error" }, a.outcome))), 6, "no actions yet");
  } catch (e) {
    fill(tbody, [], 6, `actions unavailable: ${e.message}`);
  }
}

// Lines on an inline SVG chart: series = [{name, color, values}], values
// aligned on a common x axis; the y axis starts at 0.
const PALETTE = ["#2f6fde", "#2a7a3b", "#c77800", "#7a5cd6", "#c62f2f", "#138a8a", "#a0527a", "#6b7480"];
function drawLines(svgId, legendId, series, unit) {
  const svg = document.getElementById(svgId);
  const ns = "http://www.w3.org/2000/svg";
  const W = 800, H = 160, pad = 4;
  const len = Math.max(0, ...series.map((s) => s.values.length));
  const max = Math.max(1, ...series.flatMap((s) => s.values.filter((v) => v != null)));
  const x = (i) => (len < 2 ? W / 2 : pad + (i * (W - 2 * pad)) / (len - 1));
  const y = (v) => H - pad - (v * (H - 2 * pad)) / max;
  const nodes = [];
  for (const s of series) {
    const pts = s.values.map((v, i) => (v == null ? null : `${x(i).toFixed(1)},${y(v).toFixed(1)}`)).filter(Boolean);
    if (!pts.length) continue;
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("points", pts.join(" "));
    line.setAttribute("fill", "none");
    line.setAttribute("stroke", s.color);
    line.setAttribute("stroke-width", "2");
    line.setAttribute("vector-effect", "non-scaling-stroke");
    line.setAttribute("data-series", s.name);
    nodes.push(line);
    if (pts.length === 1) { // one point draws no line: a dot
      const [cx, cy] = pts[0].split(",");
      const dot = document.createElementNS(ns, "circle");
      dot.setAttribute("cx", cx); dot.setAttribute("cy", cy); dot.setAttribute("r", "3"); dot.setAttribute("fill", s.color);
      nodes.push(dot);
    }
  }
  const label = document.createElementNS(ns, "text");
  label.setAttribute("x", "6"); label.setAttribute("y", "14"); label.setAttribute("font-size", "12"); label.setAttribute("fill", "#6b7480");
  label.textContent = series.length ? `max ${max}${unit || ""}` : "no data yet";
  nodes.push(label);
  svg.replaceChildren(...nodes);
  document.getElementById(legendId).replaceChildren(...series.map((s) =>
    el("span", {}, el("span", { class: "swatch", style: `background:${s.color}` }), s.name)));
}

// Work queue depths sampled at each poll, for the depth chart.
const depthSamples = [];
function recordDepths(queues) {
  const work = {};
  for (const q of queues) if (q.kind === "work") work[q.short || q.name] = (q.ready || 0) + (q.unacked || 0);
  depthSamples.push(work);
  if (depthSamples.length > HISTORY) depthSamples.shift();
  const names = [...new Set(depthSamples.flatMap((d) => Object.keys(d)))].sort();
  drawLines("chart-depth", "legend-depth", names.map((n, i) => ({
    name: n, color: PALETTE[i % PALETTE.length], values: depthSamples.map((d) => (n in d ? d[n] : null)),
  })));
}

async function refreshTimeline() {
  try {
    const t = await getJSON("/api/timeline");
    const color = (i) => PALETTE[i % PALETTE.length];
    const per = (pick) => t.types.map((ty, i) => ({
      name: ty, color: color(i), values: t.buckets.map((b) => (b.types[ty] ? pick(b.types[ty]) : 0)),
    }));
    drawLines("chart-throughput", "legend-throughput", per((c) => c.succeeded));
    drawLines("chart-failures", "legend-failures", per((c) => c.failed + c.dead).filter((s) => s.values.some((v) => v > 0)));
    const waits = t.buckets.map((b) => b.wait_ms);
    const lat = waits.some(Boolean) ? [["p50", "#2a7a3b"], ["p90", "#c77800"], ["p99", "#c62f2f"]].map(([p, c]) => ({
      name: p, color: c, values: waits.map((w) => (w ? w[p] : null)),
    })) : [];
    drawLines("chart-latency", "legend-latency", lat, " ms");
  } catch (e) {
    /* the charts keep their last drawing */
  }
}

function poll() {
  refreshStats();
  refreshTimeline();
  refreshQueues();
  refreshLimits();
  refreshFailures();
  refreshDead();
  refreshWaiting();
  refreshActions();
  if (shownTask) showTask(shownTask);
  if (shownWorkflow) showWorkflow(shownWorkflow);
}

document.getElementById("search").addEventListener("submit", (ev) => {
  ev.preventDefault();
  showTask(document.getElementById("search-id").value);
});
for (const id of ["filter-state", "filter-queue", "filter-since"]) {
  document.getElementById(id).addEventListener("change", refreshWaiting);
}
document.getElementById("filter-type").addEventListener("input", refreshWaiting);
document.getElementById("waiting-filter").addEventListener("submit", (ev) => { ev.preventDefault(); refreshWaiting(); });
document.getElementById("task-close").addEventListener("click", () => {
  document.getElementById("task-panel").hidden = true;
  shownTask = null;
  syncAddress();
});
document.getElementById("workflow-search").addEventListener("submit", (ev) => {
  ev.preventDefault();
  showWorkflow(document.getElementById("workflow-id").value);
});
document.getElementById("workflow-close").addEventListener("click", () => {
  shownWorkflow = null;
  workflowSeq++;
  document.getElementById("workflow-title").textContent = "";
  document.getElementById("workflow-close").hidden = true;
  document.getElementById("workflow-body").replaceChildren();
  syncAddress();
});

loadSession().then(() => {
  const params = new URLSearchParams(location.search);
  if (params.get("workflow")) showWorkflow(params.get("workflow"));
  if (params.get("task")) showTask(params.get("task"));
  poll();
  setInterval(poll, POLL_MS);
});
