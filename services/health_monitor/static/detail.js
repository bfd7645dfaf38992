// The selected task's panel: its state, plots and log tail, polled while the task runs.
import { el, field, fmtDuration, fmtTime, setBadge, setText } from "./dom.js";

const LOG_TAIL = 200;
const LOG_POLL_MS = 1000; // the log tail is refreshed this often while the task runs
const TERMINAL = new Set(["completed", "failed", "cancelled"]);

const panel = {
  taskId: null, // the selected task, or null
  snapshot: null, // the latest snapshot, for what the list already knows of the task
  timer: null,
  generation: 0, // of the latest fetch: answers to older ones are dropped
};

/** The selected task id, or null. */
export function selectedTask() {
  return panel.taskId;
}

export async function fetchJson(url) {
  const response = await fetch(url, { cache: "no-store" });
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return response.json();
}

function findTask(id) {
  const snap = panel.snapshot;
  if (!snap) return null;
  return [...snap.active, ...snap.queued, ...snap.recent].find((t) => t.task_id === id) || null;
}

/** Show a task's panel and start following it. */
export function select(taskId) {
  panel.taskId = taskId;
  const detail = document.getElementById("detail");
  detail.hidden = false;
  detail.dataset.task = taskId;
  delete detail.dataset.state;
  setText(field(detail, "task-id"), taskId);
  const plots = document.getElementById("plots");
  plots.replaceChildren();
  delete plots.dataset.signature;
  document.getElementById("logs").replaceChildren();
  for (const row of document.querySelectorAll("tr[data-task]")) {
    row.classList.toggle("selected", row.dataset.task === taskId);
  }
  refresh();
}

export function closeDetail() {
  panel.taskId = null;
  panel.generation++;
  clearTimeout(panel.timer);
  document.getElementById("detail").hidden = true;
  for (const row of document.querySelectorAll("tr.selected")) row.classList.remove("selected");
}

/** Called with every snapshot: a selected task whose state changed is fetched again at once. */
export function followSnapshot(snap) {
  panel.snapshot = snap;
  const task = panel.taskId && findTask(panel.taskId);
  if (task && document.getElementById("detail").dataset.state !== task.state) refresh();
}

/** Fetch the task and its log tail; poll again while it has not finished. */
async function refresh() {
  clearTimeout(panel.timer);
  const taskId = panel.taskId;
  if (!taskId) return;
  // A snapshot can ask for a refresh while a poll is in flight: only the latest may go on, or
  // each such overlap would start one more polling loop.
  const generation = ++panel.generation;
  const current = () => panel.generation === generation && panel.taskId === taskId;
  const base = `api/tasks/${encodeURIComponent(taskId)}`;
  let task = findTask(taskId);
  let note = "";
  try {
    const [record, logs] = await Promise.all([
      fetchJson(base),
      fetchJson(`${base}/logs?tail=${LOG_TAIL}`),
    ]);
    if (!current()) return;
    task = { ...(task || {}), ...(record.task || {}) };
    renderLogs(logs.lines || []);
  } catch (e) {
    note = `(could not load: ${e.message})`;
  }
  if (!current()) return;
  renderDetail(task, note);
  if (!task || !TERMINAL.has(task.state)) panel.timer = setTimeout(refresh, LOG_POLL_MS);
}

function renderDetail(task, note) {
  const detail = document.getElementById("detail");
  const state = (task && task.state) || "unknown";
  detail.dataset.state = state;
  setBadge(field(detail, "state"), state);
  const running = TERMINAL.has(state) ? "" : " · refreshing every second";
  setText(field(detail, "log-note"), `last ${LOG_TAIL} lines${running} ${note}`);
  if (!task) return;
  const parts = [
    task.task_type,
    task.worker && `on ${task.worker}`,
    task.attempts && `attempt ${task.attempts}`,
    task.runtime_s && `ran ${fmtDuration(task.runtime_s)}`,
  ];
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
  // A retried task appends to the same log: mark the attempt once there is more than one.
  const retried = lines.some((line) => Number(line.attempt) > 1);
  const nodes = lines.map((line) => {
    const stamp = `${fmtTime(Number(line.ts))} ${retried ? `#${line.attempt} ` : ""}`;
    return el("span", { class: line.stream, data: { stream: line.stream, attempt: line.attempt } },
      el("span", { class: "ts", text: stamp }),
      `${line.text}\n`);
  });
  if (nodes.length === 0) nodes.push(el("span", { class: "ts", text: "no log lines yet" }));
  pre.replaceChildren(...nodes);
  pre.dataset.lines = lines.length;
  if (atBottom) pre.scrollTop = pre.scrollHeight;
}
