// DOM helpers and number formatting for the dashboard. Text goes in with textContent only.

/** Create an element; attrs: {class, text, title, data: {k: v}}; children: nodes. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  if (attrs.class) node.className = attrs.class;
  if (attrs.text !== undefined) node.textContent = attrs.text;
  if (attrs.title) node.title = attrs.title;
  for (const [k, v] of Object.entries(attrs.data || {})) node.dataset[k] = v;
  for (const child of children) node.append(child);
  return node;
}

/** The element marked data-field=NAME inside node. */
export function field(node, name) {
  return node.querySelector(`[data-field="${name}"]`);
}

/** Set text only when it changed: fewer DOM mutations, and selected text stays selected. */
export function setText(node, text) {
  const value = text === null || text === undefined ? "" : String(text);
  if (node.textContent !== value) node.textContent = value;
}

/** A state badge: the value drives both the text and the colour (CSS on data-value). */
export function setBadge(node, value) {
  setText(node, value);
  node.dataset.value = value;
}

/** A table row with one cell per field name (data-field), and `badges` cells holding a badge. */
export function tableRow(attrs, fields, badges = []) {
  const row = el("tr", attrs);
  for (const key of fields) {
    const cell = el("td", { data: { field: key } });
    if (badges.includes(key)) cell.append(el("span", { class: "badge" }));
    row.append(cell);
  }
  return row;
}

/** A horizontal bar at fraction (0..1) with a centred label. */
export function bar(cls = "") {
  const fill = el("div", { class: "fill" });
  return el("div", { class: `bar ${cls}` }, fill, el("span", { class: "label" }));
}

export function setBar(node, fraction, label) {
  const pct = Math.max(0, Math.min(1, fraction || 0)) * 100;
  node.querySelector(".fill").style.width = `${pct.toFixed(1)}%`;
  setText(node.querySelector(".label"), label);
}

/**
 * Make container's children match items, reusing each child by key (data-key).
 * build(item) creates a new child, update(node, item) fills it; children of gone keys are removed.
 */
export function syncList(container, items, keyOf, build, update) {
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

export function fmtDuration(s) {
  if (s === null || s === undefined || Number.isNaN(s)) return "-";
  if (s < 1) return `${(s * 1000).toFixed(0)} ms`;
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.floor(s % 60)} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

export function fmtTime(ts) {
  return ts ? new Date(ts * 1000).toLocaleTimeString() : "-";
}

export function fmtGiB(bytes) {
  return `${(bytes / 2 ** 30).toFixed(1)}`;
}

export function fmtNumber(v) {
  if (typeof v !== "number") return String(v);
  const abs = Math.abs(v);
  if (Number.isInteger(v) && abs < 1e6) return String(v);
  if (abs !== 0 && (abs < 1e-3 || abs >= 1e6)) return v.toExponential(2);
  return v.toFixed(4).replace(/\.?0+$/, "");
}

export function shortId(id) {
  return id ? id.slice(0, 8) : "-";
}

export function shortSha(sha) {
  return sha ? sha.slice(0, 10) : "-";
}
