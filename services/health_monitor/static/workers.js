// Workers (a card each, with GPU gauges) and the other services, from a snapshot's `services`.
import {
  bar, el, field, fmtDuration, fmtGiB, setBadge, setBar, setText, shortId, shortSha, syncList,
  tableRow,
} from "./dom.js";

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
    el("header", {},
      el("span", { class: "name", text: name }),
      el("span", { class: "badge", data: { field: "state" } })),
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
  const utilLabel = util === null ? "n/a" : `${util.toFixed(0)} %`;
  setBar(field(node, "utilization"), (util || 0) / 100, utilLabel);
  const temp = gpu.temperature_c;
  const tempNode = field(node, "temperature");
  setText(tempNode, temp === null ? "temperature n/a" : `${temp.toFixed(0)} °C`);
  // 80 °C and up is where consumer cards start to throttle: worth a colour.
  tempNode.className = temp !== null && temp >= 80 ? "bad" : "";
}

export function renderServices(snap) {
  const workers = snap.services.filter((s) => s.heartbeat.worker);
  const byName = (s) => s.heartbeat.name;
  syncList(document.getElementById("workers"), workers, byName, buildWorker, updateWorker);
  const others = snap.services.filter((s) => !s.heartbeat.worker);
  syncList(
    document.getElementById("services"),
    others,
    (s) => `${s.heartbeat.kind}/${s.heartbeat.name}`,
    (s) => tableRow(
      { data: { service: `${s.heartbeat.kind}/${s.heartbeat.name}` } },
      ["kind", "name", "state", "host", "pid", "version", "uptime", "age"],
      ["state"],
    ),
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
