// tradeplat dashboard: renders the health-monitor's snapshots as they arrive over server-sent
// events (/api/stream), and the selected task's plots and log tail from the JSON API.
//
// Rules kept throughout:
// - Data is only ever written with textContent or attributes, never innerHTML: task names, log
//   lines and error messages come from task code and must not become markup.
// - Lists are updated in place by key (syncList) instead of being rebuilt, so a row keeps its
//   element, a click handler and the selection across snapshots, and progress bars animate.
// - Ages are computed against the snapshot's own clock (snapshot.ts), not the browser's, so a
//   laptop whose clock is off by a minute still shows correct ages.
"use strict";

const STALE_AFTER_S = 5; // no snapshot for this long while "connected": say the data is stale
const LOG_TAIL = 200;
const LOG_POLL_MS = 1000; // the selected task's log tail is refreshed this often while it runs
const MAX_ALERTS = 50;
const TERMINAL = new Set(["completed", "failed", "cancelled"]);

const view = {
  snapshot: null,
  receivedAt: 0, // browser time (ms) of the last snapshot
  streamAlerts: new Map(), // alerts pushed as `alert` events, by alertKey
  selected: null, // task id shown in the detail panel
  logTimer: null,
  detailFetch: 0, // generation of the latest detail fetch: older answers are dropped
  source: null,
};

// ---------- small DOM helpers ----------

/** Create an element; attrs: {class, text, title, data: {k: v}}; children: nodes. */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  if (attrs.class) node.className = attrs.class;
  if (attrs.text !== undefined) node.textContent = attrs.text;
  if (attrs.title) node.title = attrs.title;
  for (const [k, v] of Object.entries(attrs.data || {})) node.dataset[k] = v;
  for (const child of children) node.append(child);
  return node;
}

/** The element marked data-field=NAME inside node. */
function field(node, name) {
  return node.querySelector(`[data-field="${name}"]`);
}

/** Set text only when it changed: fewer DOM mutations, and selected text stays selected. */
function setText(node, text) {
  const value = text === null || text === undefined ? "" : String(text);
  if (node.textContent !== value) node.textContent = value;
}

/** A state badge: the value drives both the text and the colour (CSS on data-value). */
function setBadge(node, value) {
  setText(node, value);
  node.dataset.value = value;
}

/** A horizontal bar at fraction (0..1) with a centred label. */
function bar(cls = "") {
  return el("div", { class: `bar ${cls}` }, el("div", { class: "fill" }), el("span", { class: "label" }));
}

function setBar(node, fraction, label) {
  const pct = Math.max(0, Math.min(1, fraction || 0)) * 100;
  node.querySelector(".fill").style.width = `${pct.toFixed(1)}%`;
  setText(node.querySelector(".label"), label);
}

/**
 * Make container's children match items, reusing each child by key (data-key).
 * build(item) creates a new child, update(node, item) fills it; children of gone keys are removed.
 */
function syncList(container, items, keyOf, build, update) {
  const existing = new Map();
  for (const child of container.children) existing.set(child.dataset.key, child);
  let previous = null;
  for (const item of items) {
    const key = String(keyOf(item));
    let node = existing.get(key);
    if (node) existing.delete(key);
    else {
      node = build(item);
      node.dataset.key = key;
    }
    update(node, item);
    const wanted = previous ? previous.nextSibling : container.firstChild;
    if (node !== wanted) container.insertBefore(node, wanted);
    previous = node;
  }
  for (const node of existing.values()) node.remove();
  const empty = document.querySelector(`[data-empty-for="${container.id}"]`);
  if (empty) empty.hidden = items.length > 0;
}

// ---------- formatting ----------

function fmtDuration(s) {
  if (s === null || s === undefined || Number.isNaN(s)) return "-";
  if (s < 1) return `${(s * 1000).toFixed(0)} ms`;
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.floor(s % 60)} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

/** Age of a Unix time as of the snapshot, e.g. "12 s ago". */
function ago(ts) {
  if (!ts || !view.snapshot) return "-";
  return `${fmtDuration(Math.max(0, view.snapshot.ts - ts))} ago`;
}

function fmtTime(ts) {
  return ts ? new Date(ts * 1000).toLocaleTimeString() : "-";
}

function fmtGiB(bytes) {
  return `${(bytes / 2 ** 30).toFixed(1)}`;
}

function fmtNumber(v) {
  if (typeof v !== "number") return String(v);
  const abs = Math.abs(v);
  if (Number.isInteger(v) && abs < 1e6) return String(v);
  if (abs !== 0 && (abs < 1e-3 || abs >= 1e6)) return v.toExponential(2);
  return v.toFixed(4).replace(/\.?0+$/, "");
}

function shortId(id) {
  return id ? id.slice(0, 8) : "-";
}

function shortSha(sha) {
  return sha ? sha.slice(0, 10) : "-";
}

// ---------- health banner and connection ----------

function renderHealth(snap) {
  const banner = document.getElementById("health");
  banner.dataset.healthy = String(snap.healthy);
  const n = snap.problems.length;
  setText(field(banner, "summary"), snap.healthy ? "healthy" : `${n} problem${n === 1 ? "" : "s"}`);
  syncList(document.getElementById("problems"), snap.problems, (p) => p, () => el("li"), setText);
  setText(document.getElementById("updated"), `updated ${fmtTime(snap.ts)}`);
}

function setConnection(state) {
  const node = document.getElementById("conn");
  if (node.dataset.state === state) return;
  node.dataset.state = state;
  node.textContent = state === "live" ? "live" : state;
}

// A snapshot stream that stays open but goes quiet (monitor wedged, proxy buffering) would
// otherwise leave old states on screen looking current.
setInterval(() => {
  const conn = document.getElementById("conn");
  if (conn.dataset.state === "live" && Date.now() - view.receivedAt > STALE_AFTER_S * 1000) {
    setConnection("stale");
  }
}, 1000);

// ---------- workers and services ----------

function buildWorker(status) {
  const name = status.heartbeat.name;
  const facts = el("dl", { class: "facts" });
  for (const [label, key] of [
    ["host", "host"], ["pid", "pid"], ["version", "version"], ["commit", "commit"],
    ["uptime", "uptime"], ["last beat", "age"], ["slots", "slots"], ["running", "current"],
  ]) {
    facts.append(el("dt", { text: label }), el("dd", { data: { field: key } }));
  }
  return el(
    "article",
    { class: "card worker", data: { worker: name } },
    el("header", {}, el("span", { class: "name", text: name }), el("span", { class: "badge", data: { field: "state" } })),
    facts,
    el("div", { data: { field: "gpu" } }),
  );
}

function updateWorker(node, status) {
  const beat = status.heartbeat;
  const facts = beat.worker;
  node.dataset.state = status.state;
  setBadge(field(node, "state"), status.state);
  setText(field(node, "host"), beat.host);
  setText(field(node, "pid"), beat.pid);
  setText(field(node, "version"), beat.version);
  setText(field(node, "commit"), shortSha(beat.code_commit));
  setText(field(node, "uptime"), fmtDuration(beat.ts - beat.started_at));
  setText(field(node, "age"), `${fmtDuration(status.age_s)} ago`);
  const slots = Object.entries(facts.slots).map(([lane, n]) => `${lane} ${n}`);
  setText(field(node, "slots"), slots.join(", ") || "-");
  const running = facts.running.map((t) => `${t.task_type} ${shortId(t.task_id)} (${t.lane})`);
  const flags = [facts.draining && "draining", facts.restart_pending && "restart pending"];
  let current = [...running, ...flags.filter(Boolean)].join(", ") || "idle";
  // An offline worker's facts are from its last heartbeat: say so rather than claim it runs them.
  if (status.state === "offline") {
    current = beat.stopped ? "stopped cleanly" : `lost; last heartbeat said: ${current}`;
  }
  setText(field(node, "current"), current);
  renderGpus(field(node, "gpu"), facts.gpu);
}

function renderGpus(container, report) {
  const gpus = (report && report.gpus) || [];
  if (gpus.length === 0) {
    syncList(container, [report?.error || "no GPU"], (e) => `none:${e}`,
      () => el("div", { class: "nogpu" }), setText);
    return;
  }
  syncList(container, gpus, (g) => g.index, buildGpu, updateGpu);
}

function buildGpu(gpu) {
  const gauge = (label, key) => {
    const gaugeBar = bar();
    gaugeBar.dataset.field = key;
    return el("div", { class: "gauge" }, el("span", { text: label }), gaugeBar);
  };
  return el("div", { class: "gpu", data: { gpu: gpu.index } },
    el("div", { data: { field: "gpu-name" } }),
    gauge("mem", "memory"),
    gauge("util", "utilization"),
    el("div", { data: { field: "temperature" } }));
}

function updateGpu(node, gpu) {
  setText(field(node, "gpu-name"), `GPU ${gpu.index}: ${gpu.name}`);
  const used = gpu.memory_used_bytes;
  const total = gpu.memory_total_bytes;
  setBar(field(node, "memory"), total ? used / total : 0, `${fmtGiB(used)} / ${fmtGiB(total)} GiB`);
  const util = gpu.utilization_pct;
  setBar(field(node, "utilization"), (util || 0) / 100, util === null ? "n/a" : `${util.toFixed(0)} %`);
  const temp = gpu.temperature_c;
  const tempNode = field(node, "temperature");
  setText(tempNode, temp === null ? "temperature n/a" : `${temp.toFixed(0)} °C`);
  // 80 °C and up is where consumer cards start to throttle: worth a colour.
  tempNode.className = temp !== null && temp >= 80 ? "bad" : "";
}

function renderServices(snap) {
  const workers = snap.services.filter((s) => s.heartbeat.worker);
  syncList(document.getElementById("workers"), workers, (s) => s.heartbeat.name, buildWorker, updateWorker);
  const others = snap.services.filter((s) => !s.heartbeat.worker);
  syncList(
    document.getElementById("services"),
    others,
    (s) => `${s.heartbeat.kind}/${s.heartbeat.name}`,
    (s) => {
      const row = el("tr", { data: { service: `${s.heartbeat.kind}/${s.heartbeat.name}` } });
      for (const key of ["kind", "name", "state", "host", "pid", "version", "uptime", "age"]) {
        const cell = el("td", { data: { field: key } });
        if (key === "state") cell.append(el("span", { class: "badge" }));
        row.append(cell);
      }
      return row;
    },
    (row, s) => {
      const beat = s.heartbeat;
      row.dataset.state = s.state;
      setText(field(row, "kind"), beat.kind);
      setText(field(row, "name"), beat.name);
      setBadge(field(row, "state").firstChild, s.state);
      setText(field(row, "host"), beat.host);
      setText(field(row, "pid"), beat.pid);
      setText(field(row, "version"), beat.version);
      setText(field(row, "uptime"), fmtDuration(beat.ts - beat.started_at));
      setText(field(row, "age"), `${fmtDuration(s.age_s)} ago`);
    },
  );
}

// ---------- tasks: active, queued, recent ----------

/** A table row for a task with the given cell fields; clicking it selects the task. */
function taskRow(task, fields) {
  const row = el("tr", { class: "clickable", data: { task: task.task_id } });
  for (const key of fields) row.append(el("td", { data: { field: key } }));
  row.addEventListener("click", () => select(task.task_id));
  return row;
}

function buildActive(task) {
  const row = taskRow(task, ["id", "type", "worker", "attempt", "running", "progress"]);
  const cell = field(row, "progress");
  cell.className = "progress-cell";
  cell.append(bar(), el("div", { class: "message", data: { field: "message" } }));
  return row;
}

function updateActive(row, task) {
  row.dataset.state = task.state;
  row.dataset.progress = task.progress ?? "";
  row.classList.toggle("selected", task.task_id === view.selected);
  setText(field(row, "id"), shortId(task.task_id));
  field(row, "id").title = task.task_id;
  setText(field(row, "type"), task.task_type);
  setText(field(row, "worker"), task.worker || "-");
  setText(field(row, "attempt"), task.attempts);
  const runtime = task.runtime_s ?? (task.running_at ? view.snapshot.ts - task.running_at : null);
  setText(field(row, "running"), fmtDuration(runtime));
  const label = task.progress === null ? task.state : `${(task.progress * 100).toFixed(0)} %`;
  setBar(field(row, "progress").querySelector(".bar"), task.progress, label);
  setText(field(row, "message"), task.progress_message);
}

function updateQueued(row, task, position) {
  row.dataset.state = task.state;
  row.classList.toggle("selected", task.task_id === view.selected);
  setText(field(row, "pos"), position);
  setText(field(row, "priority"), task.priority);
  setText(field(row, "id"), shortId(task.task_id));
  field(row, "id").title = task.task_id;
  setText(field(row, "type"), task.task_type);
  const since = task.queued_at || task.submitted_at;
  setText(field(row, "age"), since ? fmtDuration(view.snapshot.ts - since) : "-");
  const note = [task.waiting, task.attempts ? `attempt ${task.attempts + 1}` : ""];
  setText(field(row, "note"), note.filter(Boolean).join(" · "));
}

function buildMetrics(metrics) {
  return Object.entries(metrics || {}).map(([k, v]) =>
    el("span", { data: { metric: k } }, el("b", { text: `${k} ` }), fmtNumber(v)));
}

function updateRecent(row, task) {
  row.dataset.state = task.state;
  row.classList.toggle("selected", task.task_id === view.selected);
  setText(field(row, "id"), shortId(task.task_id));
  field(row, "id").title = task.task_id;
  setText(field(row, "type"), task.task_type);
  setBadge(field(row, "state").firstChild, task.state);
  setText(field(row, "worker"), task.worker || "-");
  setText(field(row, "runtime"), fmtDuration(task.runtime_s));
  setText(field(row, "finished"), ago(task.finished_at));
  const cell = field(row, "metrics");
  // Metrics of a finished task do not change: build them once (and again only if they do).
  const signature = JSON.stringify([task.metrics, task.error]);
  if (cell.dataset.signature !== signature) {
    cell.dataset.signature = signature;
    const box = el("div", { class: "metrics" }, ...buildMetrics(task.metrics));
    if (task.error) box.append(el("span", { class: "error", text: task.error.slice(0, 200) }));
    cell.replaceChildren(box);
  }
}

function renderTasks(snap) {
  syncList(document.getElementById("active"), snap.active, (t) => t.task_id, buildActive, updateActive);
  let position = 0;
  syncList(
    document.getElementById("queued"),
    snap.queued,
    (t) => t.task_id,
    (t) => taskRow(t, ["pos", "priority", "id", "type", "age", "note"]),
    (row, t) => updateQueued(row, t, ++position),
  );
  syncList(
    document.getElementById("recent"),
    snap.recent,
    (t) => t.task_id,
    (t) => {
      const row = taskRow(t, ["id", "type", "state", "worker", "runtime", "finished", "metrics"]);
      field(row, "state").append(el("span", { class: "badge" }));
      return row;
    },
    updateRecent,
  );
}

// ---------- queues and counts ----------

function isDeadLetterQueue(q) {
  return q.route === "dead" || q.name.endsWith(".dead");
}

function renderQueues(snap) {
  syncList(
    document.getElementById("queues"),
    snap.queues,
    (q) => q.name,
    (q) => {
      const row = el("tr", { data: { queue: q.name } });
      for (const key of ["name", "route", "messages", "consumers"]) row.append(el("td", { data: { field: key } }));
      return row;
    },
    (row, q) => {
      row.dataset.messages = q.messages;
      row.dataset.consumers = q.consumers;
      // Work waiting with nobody to take it is the situation the monitor alerts on.
      row.classList.toggle("warn", q.messages > 0 && q.consumers === 0 && !isDeadLetterQueue(q));
      setText(field(row, "name"), q.name);
      setText(field(row, "route"), q.route);
      setText(field(row, "messages"), q.messages);
      setText(field(row, "consumers"), q.consumers);
    },
  );
  const dead = snap.queues.filter(isDeadLetterQueue).reduce((n, q) => n + q.messages, 0);
  setText(document.getElementById("dead-letters"), dead);
  const oldest = snap.oldest_queued_age_s;
  setText(document.getElementById("oldest-queued"), oldest === null ? "-" : fmtDuration(oldest));
  syncList(
    document.getElementById("task-counts"),
    Object.entries(snap.tasks_by_state),
    ([state]) => state,
    ([state]) => el("li", { data: { stateCount: state } }),
    (li, [state, n]) => setText(li, `${state}: ${n}`),
  );
}

// ---------- sync ----------

function renderSync(snap) {
  syncList(
    document.getElementById("git-sync"),
    snap.sync.git,
    (g) => g.host,
    (g) => {
      const row = el("tr", { data: { gitHost: g.host } });
      for (const key of ["host", "state", "branch", "behind", "ahead", "fetch", "message"]) {
        row.append(el("td", { data: { field: key } }));
      }
      field(row, "state").append(el("span", { class: "badge" }));
      return row;
    },
    (row, g) => {
      row.dataset.state = g.state;
      setText(field(row, "host"), g.host);
      setBadge(field(row, "state").firstChild, g.state);
      setText(field(row, "branch"), g.branch || "-");
      setText(field(row, "behind"), g.behind);
      setText(field(row, "ahead"), g.ahead);
      setText(field(row, "fetch"), ago(g.last_fetch_at));
      setText(field(row, "message"), g.last_error || g.message);
    },
  );
  const backlog = document.getElementById("artifact-backlog");
  setText(field(backlog, "pending"), snap.sync.artifacts_pending);
  setText(field(backlog, "syncing"), snap.sync.artifacts_syncing);
  setText(field(backlog, "failed"), snap.sync.artifacts_failed);
  backlog.classList.toggle("bad", snap.sync.artifacts_failed > 0);
  syncList(
    document.getElementById("artifacts"),
    snap.sync.artifacts,
    (a) => a.task_id,
    (a) => {
      const row = el("tr", { data: { artifactTask: a.task_id } });
      for (const key of ["id", "state", "progress", "error"]) row.append(el("td", { data: { field: key } }));
      field(row, "state").append(el("span", { class: "badge" }));
      return row;
    },
    (row, a) => {
      setText(field(row, "id"), shortId(a.task_id));
      setBadge(field(row, "state").firstChild, a.state);
      const pct = a.bytes_total ? ` (${((100 * a.bytes_done) / a.bytes_total).toFixed(0)} %)` : "";
      setText(field(row, "progress"), `${a.files} files${pct}`);
      setText(field(row, "error"), a.error || "");
    },
  );
}

// ---------- alerts ----------

function alertKey(a) {
  return `${a.kind}|${a.subject}|${a.ts}|${a.resolved}`;
}

/**
 * The snapshot's alerts plus those pushed as events since (an alert event can arrive between
 * two snapshots), newest first. A fired alert counts as resolved once a later resolution of the
 * same kind and subject exists, so only what still needs a person stands out.
 */
function mergedAlerts(snap) {
  const all = new Map();
  for (const a of [...snap.alerts, ...view.streamAlerts.values()]) all.set(alertKey(a), a);
  const list = [...all.values()].sort((a, b) => b.ts - a.ts).slice(0, MAX_ALERTS);
  const resolvedAt = new Map();
  for (const a of list) {
    const key = `${a.kind}|${a.subject}`;
    if (a.resolved) resolvedAt.set(key, Math.max(resolvedAt.get(key) || 0, a.ts));
  }
  return list.map((a) => ({ ...a, over: a.resolved || (resolvedAt.get(`${a.kind}|${a.subject}`) || 0) >= a.ts }));
}

function renderAlerts() {
  if (!view.snapshot) return;
  syncList(
    document.getElementById("alerts"),
    mergedAlerts(view.snapshot),
    alertKey,
    (a) =>
      el("li", { data: { alertKind: a.kind, alertSubject: a.subject } },
        el("span", { class: "when", text: fmtTime(a.ts) }),
        el("span", { class: "kind", text: a.resolved ? `${a.kind} resolved` : a.kind }),
        el("span", { text: a.message })),
    (li, a) => {
      li.dataset.resolved = String(a.over);
    },
  );
  // An event the snapshot now lists is kept there; the rest stay until pushed out by newer ones.
  for (const a of view.snapshot.alerts) view.streamAlerts.delete(alertKey(a));
  const excess = [...view.streamAlerts.keys()].slice(0, Math.max(0, view.streamAlerts.size - MAX_ALERTS));
  for (const key of excess) view.streamAlerts.delete(key);
}

// ---------- the selected task: plots and log tail ----------

function findTask(id) {
  const snap = view.snapshot;
  if (!snap) return null;
  return [...snap.active, ...snap.queued, ...snap.recent].find((t) => t.task_id === id) || null;
}

function select(taskId) {
  view.selected = taskId;
  const detail = document.getElementById("detail");
  detail.hidden = false;
  detail.dataset.task = taskId;
  setText(field(detail, "task-id"), taskId);
  document.getElementById("plots").replaceChildren();
  delete document.getElementById("plots").dataset.signature;
  document.getElementById("logs").replaceChildren();
  for (const row of document.querySelectorAll("tr[data-task]")) {
    row.classList.toggle("selected", row.dataset.task === taskId);
  }
  refreshDetail();
}

function closeDetail() {
  view.selected = null;
  view.detailFetch++;
  clearTimeout(view.logTimer);
  document.getElementById("detail").hidden = true;
  for (const row of document.querySelectorAll("tr.selected")) row.classList.remove("selected");
}

async function fetchJson(url) {
  const response = await fetch(url, { cache: "no-store" });
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return response.json();
}

/** Fetch the task and its log tail; poll again while it has not finished. */
async function refreshDetail() {
  clearTimeout(view.logTimer);
  const taskId = view.selected;
  if (!taskId) return;
  // A snapshot can ask for a refresh while a poll is in flight: only the latest may go on, or
  // each such overlap would start one more polling loop.
  const generation = ++view.detailFetch;
  const current = () => view.detailFetch === generation && view.selected === taskId;
  const base = `api/tasks/${encodeURIComponent(taskId)}`;
  let task = findTask(taskId);
  let note = "";
  try {
    const [record, logs] = await Promise.all([fetchJson(base), fetchJson(`${base}/logs?tail=${LOG_TAIL}`)]);
    if (!current()) return;
    task = { ...(task || {}), ...(record.task || {}) };
    renderLogs(logs.lines || []);
  } catch (e) {
    note = `(could not load: ${e.message})`;
  }
  if (!current()) return;
  renderDetail(task, note);
  if (!task || !TERMINAL.has(task.state)) {
    view.logTimer = setTimeout(refreshDetail, LOG_POLL_MS);
  }
}

function renderDetail(task, note) {
  const detail = document.getElementById("detail");
  const state = (task && task.state) || "unknown";
  detail.dataset.state = state;
  setBadge(field(detail, "state"), state);
  const running = TERMINAL.has(state) ? "" : " · refreshing every second";
  setText(field(detail, "log-note"), `last ${LOG_TAIL} lines${running} ${note}`);
  if (!task) return;
  const parts = [task.task_type, task.worker && `on ${task.worker}`,
    task.attempts && `attempt ${task.attempts}`, task.runtime_s && `ran ${fmtDuration(task.runtime_s)}`];
  setText(field(detail, "summary"), parts.filter(Boolean).join(" · "));
  setText(field(detail, "error"), task.error || "");
  renderPlots(task);
}

function renderPlots(task) {
  const container = document.getElementById("plots");
  const names = task.plots || [];
  // A plot file is rewritten while a task runs: the state in the signature reloads it at the end.
  const signature = JSON.stringify([names, task.state]);
  if (container.dataset.signature === signature) return;
  container.dataset.signature = signature;
  const base = `api/tasks/${encodeURIComponent(task.task_id)}/plots/`;
  container.replaceChildren(...names.map((name) => {
    const img = el("img", { title: name, data: { plot: name } });
    img.alt = name;
    img.src = `${base}${encodeURIComponent(name)}?state=${encodeURIComponent(task.state)}`;
    return el("figure", {}, img, el("figcaption", { text: name }));
  }));
}

function renderLogs(lines) {
  const pre = document.getElementById("logs");
  // Follow the tail only if the reader is already at the bottom: do not yank them while reading.
  const atBottom = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 20;
  const nodes = lines.map((line) =>
    el("span", { class: line.stream, data: { stream: line.stream } },
      el("span", { class: "ts", text: `${fmtTime(line.ts)} ` }),
      `${line.text}\n`));
  if (nodes.length === 0) nodes.push(el("span", { class: "ts", text: "no log lines yet" }));
  pre.replaceChildren(...nodes);
  pre.dataset.lines = lines.length;
  if (atBottom) pre.scrollTop = pre.scrollHeight;
}

// ---------- snapshot and stream ----------

function render(snap) {
  view.snapshot = snap;
  view.receivedAt = Date.now();
  renderHealth(snap);
  renderServices(snap);
  renderTasks(snap);
  renderQueues(snap);
  renderSync(snap);
  renderAlerts();
  // A selected task that just finished: fetch once more for its final logs and plots.
  const task = view.selected && findTask(view.selected);
  const detail = document.getElementById("detail");
  if (task && detail.dataset.state !== task.state) refreshDetail();
}

function onSnapshot(data) {
  try {
    render(JSON.parse(data));
    setConnection("live");
  } catch (e) {
    // One malformed snapshot must not stop the page: keep the last good one on screen.
    console.error("bad snapshot", e);
  }
}

function connect() {
  const source = new EventSource("api/stream");
  view.source = source;
  source.addEventListener("snapshot", (e) => onSnapshot(e.data));
  source.addEventListener("alert", (e) => {
    const a = JSON.parse(e.data);
    view.streamAlerts.set(alertKey(a), a);
    renderAlerts();
  });
  source.addEventListener("error", () => {
    setConnection("disconnected");
    // EventSource retries by itself after a dropped connection; it gives up (CLOSED) only when
    // the server answers with an error status, e.g. while the monitor restarts behind a proxy.
    if (source.readyState === EventSource.CLOSED) setTimeout(connect, 2000);
  });
}

document.getElementById("detail-close").addEventListener("click", closeDetail);
// The first picture comes from /api/snapshot so the page is filled before the first event.
fetchJson("api/snapshot").then((snap) => { if (!view.snapshot) render(snap); }).catch(() => {});
connect();
