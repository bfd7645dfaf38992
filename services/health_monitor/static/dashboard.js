// tradeplat dashboard: renders the health-monitor's snapshots as they arrive over server-sent
// events (/api/stream). Workers are drawn by workers.js, the selected task's plots and log tail
// by detail.js, helpers are in dom.js (ES modules: no build step).
//
// Rules kept throughout:
// - Data is only ever written with textContent or attributes, never innerHTML: task names, log
//   lines and error messages come from task code and must not become markup.
// - Lists are updated in place by key (syncList) instead of being rebuilt, so a row keeps its
//   element, a click handler and the selection across snapshots, and progress bars animate.
// - Ages are computed against the snapshot's own clock (snapshot.ts), not the browser's, so a
//   laptop whose clock is off by a minute still shows correct ages.
import {
  bar, el, field, fmtDuration, fmtNumber, fmtTime, setBadge, setBar, setText, shortId, syncList,
  tableRow,
} from "./dom.js";
import { closeDetail, fetchJson, followSnapshot, select, selectedTask } from "./detail.js";
import { renderServices } from "./workers.js";

// No snapshot for this long (or 3 of the monitor's own intervals, if longer) while connected:
// say the data is stale.
const STALE_AFTER_MS = 5000;
const MAX_ALERTS = 50;

const view = {
  snapshot: null,
  receivedAt: 0, // browser time (ms) of the last snapshot
  gapMs: 0, // time between the last two snapshots: the monitor's interval as seen from here
  streamAlerts: new Map(), // alerts pushed as `alert` events, by alertKey
};

/** Age of a Unix time as of the snapshot, e.g. "12 s ago". */
function ago(ts) {
  if (!ts || !view.snapshot) return "-";
  return `${fmtDuration(Math.max(0, view.snapshot.ts - ts))} ago`;
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
  node.textContent = state;
}

// A snapshot stream that stays open but goes quiet (monitor wedged, proxy buffering) would
// otherwise leave old states on screen looking current.
setInterval(() => {
  const conn = document.getElementById("conn");
  const limit = Math.max(STALE_AFTER_MS, 3 * view.gapMs);
  if (conn.dataset.state === "live" && Date.now() - view.receivedAt > limit) {
    setConnection("stale");
  }
}, 1000);

// ---------- tasks: active, queued, recent ----------

/** A table row for a task with the given cell fields; clicking it selects the task. */
function taskRow(task, fields, badges = []) {
  const row = tableRow({ class: "clickable", data: { task: task.task_id } }, fields, badges);
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
  row.classList.toggle("selected", task.task_id === selectedTask());
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
  row.classList.toggle("selected", task.task_id === selectedTask());
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
  row.classList.toggle("selected", task.task_id === selectedTask());
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
  const byId = (t) => t.task_id;
  syncList(document.getElementById("active"), snap.active, byId, buildActive, updateActive);
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
    (t) => taskRow(
      t,
      ["id", "type", "state", "worker", "runtime", "finished", "metrics"],
      ["state"],
    ),
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
    (q) => tableRow({ data: { queue: q.name } }, ["name", "route", "messages", "consumers"]),
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
    (g) => tableRow(
      { data: { gitHost: g.host } },
      ["host", "state", "branch", "behind", "ahead", "fetch", "message"],
      ["state"],
    ),
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
    (a) => tableRow(
      { data: { artifactTask: a.task_id } },
      ["id", "state", "progress", "error"],
      ["state"],
    ),
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
  const over = (a) => a.resolved || (resolvedAt.get(`${a.kind}|${a.subject}`) || 0) >= a.ts;
  return list.map((a) => ({ ...a, over: over(a) }));
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
  const keys = [...view.streamAlerts.keys()]; // oldest first: a Map keeps insertion order
  for (const key of keys.slice(0, keys.length - MAX_ALERTS)) view.streamAlerts.delete(key);
}

// ---------- snapshot and stream ----------

function render(snap) {
  const now = Date.now();
  // Only a gap within one live stream measures the interval, not the pause of a reconnect.
  const live = document.getElementById("conn").dataset.state === "live";
  if (view.receivedAt && live) view.gapMs = now - view.receivedAt;
  view.snapshot = snap;
  view.receivedAt = now;
  renderHealth(snap);
  renderServices(snap);
  renderTasks(snap);
  renderQueues(snap);
  renderSync(snap);
  renderAlerts();
  followSnapshot(snap);
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
