// The dashboard's page-building parts, loaded before app.js (which polls the API and
// calls them): elements, tables updated in place, formats, and the busy-time chart.
"use strict";

const DAYS = 7; // the chart's span

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== null && value !== undefined) node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) {
      node.append(child instanceof Node ? child : String(child));
    }
  }
  return node;
}

const rowKey = (tr) => tr.dataset.job ?? tr.dataset.module ?? tr.dataset.schedule ?? "";

// A table's rows, updated in place: rows matched by key, and in them only the cells whose
// content changed are replaced, so a focused button, a text selection or a scrolled error
// in an unchanged cell stay as they are; nothing at all is touched when nothing changed.
// While the user selects text in the table, it waits: redrawn once the selection is gone.
function fill(tableId, rows, columns, empty) {
  const body = document.querySelector(`#${tableId} tbody`);
  const selection = document.getSelection();
  if (selection && !selection.isCollapsed && selection.containsNode(body, true)) return;
  const wanted = rows.length ? rows : [
    el("tr", {}, el("td", { class: "empty", colspan: columns }, empty))];
  const old = new Map([...body.children].map((tr) => [rowKey(tr), tr]));
  const next = wanted.map((tr) => {
    const was = old.get(rowKey(tr));
    old.delete(rowKey(tr));
    return was ? patchRow(was, tr) : signed(tr);
  });
  for (const gone of old.values()) gone.remove();
  next.forEach((tr, i) => {
    if (body.children[i] !== tr) body.insertBefore(tr, body.children[i] || null);
  });
}

// Each cell remembers what it was drawn from: what the user did to it since (an error
// scrolled, expanded) is not a change.
function signed(tr) {
  for (const cell of tr.children) cell.drawn = cell.outerHTML;
  return tr;
}

function patchRow(old, fresh) {
  for (const name of old.getAttributeNames()) {
    if (!fresh.hasAttribute(name)) old.removeAttribute(name);
  }
  for (const name of fresh.getAttributeNames()) {
    if (old.getAttribute(name) !== fresh.getAttribute(name)) {
      old.setAttribute(name, fresh.getAttribute(name));
    }
  }
  const cells = [...fresh.children];
  cells.forEach((cell, i) => {
    const was = old.children[i];
    cell.drawn = cell.outerHTML;
    if (!was) old.append(cell);
    else if (was.drawn !== cell.drawn) was.replaceWith(cell);
  });
  while (old.children.length > cells.length) old.lastElementChild.remove();
  return old;
}

function setText(id, text) {
  if ($(id).textContent !== text) $(id).textContent = text;
}

const num = (n) => (n === null || n === undefined ? "-" : n.toLocaleString());

function ago(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 120) return `${seconds.toFixed(1)} s`;
  if (seconds < 7200) return `${Math.round(seconds / 60)} min`;
  if (seconds < 172800) return `${(seconds / 3600).toFixed(1)} h`;
  // Days past two (a job delayed a year read "8760.0 h"), as the CLI writes them ("d").
  return `${Math.round(seconds / 86400).toLocaleString()} d`;
}

// A long error scrolls in its box; a button shows it whole.
function errorBox(text) {
  const pre = el("pre", { class: "error" }, text);
  if (text.length < 300 && text.split("\n").length <= 4) return pre;
  const more = el("button", { type: "button", class: "more", onclick: () => {
    more.textContent = pre.classList.toggle("whole") ? "show less" : "show all";
  } }, "show all");
  return el("div", {}, pre, more);
}

// A time of day, with its weekday within the week around today, else with its date (and
// its year, if not this year's): a job due in a month once read as "Mon 10:00".
function shortClock(at) {
  const now = new Date();
  if (at.toDateString() === now.toDateString()) {
    return at.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }
  const near = Math.abs(at - now) < 6 * 86400 * 1000;
  return at.toLocaleString([], near ? { weekday: "short", hour: "2-digit", minute: "2-digit" }
    : { ...yearIfNotThis(at), month: "short", day: "numeric", hour: "2-digit",
      minute: "2-digit" });
}

function clock(when) {
  if (when === null || when === undefined) return "-";
  const at = new Date(when * 1000);
  return at.toLocaleString([], { ...yearIfNotThis(at), weekday: "short", month: "short",
    day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

const yearIfNotThis = (at) =>
  (at.getFullYear() === new Date().getFullYear() ? {} : { year: "numeric" });

// --- the busy-time chart ------------------------------------------------------------

// The busy-time chart: a day x hour grid (local time), each cell as dark as the share of
// the workers' time spent running jobs in that hour, from the queue's run history (on
// Redis, every instance's runs: so the share is of every live instance's workers).
function drawChart(stats) {
  const SVG = "http://www.w3.org/2000/svg";
  const cell = 26, gap = 2, left = 80, top = 18;
  const workers = Math.max(1, stats.cluster_workers ?? stats.workers);
  const busy = new Map(stats.window.by_hour.map((h) => [h.hour, h]));
  const today = new Date();
  today.setHours(0, 0, 0, 0);
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("id", "busy-chart");
  const width = left + 24 * (cell + gap), height = top + DAYS * (cell + gap) + 4;
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);  // scales down on a narrow screen
  const text = (x, y, value, anchor = "middle") => {
    const t = document.createElementNS(SVG, "text");
    t.setAttribute("x", x); t.setAttribute("y", y); t.setAttribute("text-anchor", anchor);
    t.textContent = value;
    svg.append(t);
  };
  for (let h = 0; h < 24; h += 3) text(left + h * (cell + gap) + cell / 2, 12, `${h}:00`);
  let total = 0;
  const perHour = new Array(24).fill(0);
  // The history comes in UTC hours; a local hour (at :30 or :45 of one in some zones)
  // takes its share of each UTC hour it overlaps.
  // The hour going on now has only run until now: its share goes by that part, not by
  // the whole hour (which would put half of it in a local hour still to come).
  const now = Date.now() / 1000;
  const inHour = (start) => {
    const from = start / 1000, first = Math.floor(from / 3600) * 3600;
    let seconds = 0, runs = 0;
    for (const hour of [first, first + 3600]) {
      const row = busy.get(hour), end = Math.min(hour + 3600, now);
      if (!row || end <= hour) continue;
      const share = Math.max(0, Math.min(end, from + 3600) - Math.max(hour, from)) / (end - hour);
      seconds += row.busy_seconds * share; runs += row.runs * share;
    }
    return { seconds, runs: Math.round(runs) };
  };
  for (let d = DAYS - 1; d >= 0; d--) {
    const day = new Date(today);
    day.setDate(today.getDate() - d);  // (not d x 24 h back: a DST change day is 23 or 25 h)
    const y = top + (DAYS - 1 - d) * (cell + gap);
    text(left - 8, y + cell / 2 + 4,
      day.toLocaleDateString(undefined, { weekday: "short", day: "numeric" }), "end");
    for (let h = 0; h < 24; h++) {
      const start = new Date(day); start.setHours(h);
      const { seconds, runs } = inHour(start.getTime());
      total += seconds;
      perHour[h] += seconds;
      const share = Math.min(1, seconds / (3600 * workers));
      const rect = document.createElementNS(SVG, "rect");
      rect.setAttribute("class", "cell");
      rect.setAttribute("x", left + h * (cell + gap)); rect.setAttribute("y", y);
      rect.setAttribute("width", cell); rect.setAttribute("height", cell);
      rect.setAttribute("rx", 3);
      rect.setAttribute("data-busy", seconds.toFixed(1));
      rect.setAttribute("fill", seconds > 0
        ? `rgba(37, 99, 235, ${0.15 + 0.85 * Math.sqrt(share)})` : "#eef1f5");
      const title = document.createElementNS(SVG, "title");
      title.textContent = `${start.toLocaleString()}: ${ago(seconds)} busy, ` +
        `${runs.toLocaleString()} runs (${Math.round(share * 100)}% of ${workers} workers)`;
      rect.append(title);
      svg.append(rect);
    }
  }
  const empty = stats.window.runs === 0;
  document.getElementById("chart").replaceChildren(svg, empty ? el("p", { class: "chart-empty" },
    "No job has run in the last 7 days, so every hour is blank. Each hour darkens as " +
    "queued jobs run in it; the service keeps [queue] keep_history of run history.") : "");
  if (empty) {
    document.getElementById("chart-note").textContent = "nothing to show yet";
    return;
  }
  const quiet = perHour.map((s, h) => [s, h]).sort((a, b) => a[0] - b[0]).slice(0, 3)
    .map(([, h]) => `${h}:00`).sort((a, b) => parseInt(a) - parseInt(b));
  document.getElementById("chart-note").textContent =
    `${ago(total)} busy in ${stats.window.runs.toLocaleString()} runs; ` +
    `quietest hours: ${quiet.join(", ")}`;
}
