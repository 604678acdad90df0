// The dashboard: polls the JSON API (docs/http.md) and redraws. No framework, no build
// step, nothing from a CDN: it must work on a host without internet.
"use strict";

const API = "/api/v1";
const POLL_MS = 2000;
const CHART_MS = 30000;
const DAYS = 7;
const RECENT = 15; // finished jobs shown, newest first

let token = localStorage.getItem("bgservice-token") || "";
if (location.hash.startsWith("#token=")) {
  token = decodeURIComponent(location.hash.slice(7));
  localStorage.setItem("bgservice-token", token);
  history.replaceState(null, "", location.pathname);
}

async function api(path, options = {}) {
  const headers = token ? { Authorization: "Bearer " + token } : {};
  const response = await fetch(API + path, { ...options, headers });
  if (response.status === 401) {
    document.getElementById("login").hidden = false;
    throw new Error("a token is needed");
  }
  const body = await response.json();
  if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
  return body;
}

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

function fill(tableId, rows, columns, empty) {
  const body = document.querySelector(`#${tableId} tbody`);
  body.replaceChildren(...(rows.length ? rows : [
    el("tr", {}, el("td", { class: "empty", colspan: columns }, empty)),
  ]));
}

function ago(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 120) return `${seconds.toFixed(1)} s`;
  if (seconds < 7200) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

// --- the parts ------------------------------------------------------------------------

function drawSummary(stats, queue) {
  const items = [
    ["up", ago(stats.uptime)],
    ["requests", stats.requests.toLocaleString()],
    ["errors", stats.errors.toLocaleString()],
    ["connections", stats.connections.open],
    ["loop lag", `${stats.loop_lag_ms.last.toFixed(1)} ms`],
    ["finished/min", queue.finished_per_minute],
  ];
  document.getElementById("summary").replaceChildren(
    ...items.map(([k, v]) => el("div", {}, el("dt", {}, k), el("dd", {}, v))));
}

function drawModules(modules, stats) {
  const rows = modules.map((m) => {
    const calls = Object.values(stats.modules[m.name] || {});
    const sum = (key) => calls.reduce((n, row) => n + (row[key] || 0), 0);
    const state = m.error ? "failed" : "loaded";
    return el("tr", { "data-module": m.name, "data-state": state },
      el("td", {}, m.name),
      el("td", {},
        el("span", { class: `state ${state}` },
          !m.error ? "loaded" : m.execution ? "reload failed, last good version serving"
            : "failed to load"),
        m.error ? el("pre", { class: "error" }, m.error) : null),
      el("td", {}, m.execution || "-"),
      el("td", {}, m.accepts.join(", ") || "-"),
      el("td", {}, m.timeout ? `${m.timeout} s` : "-"),
      el("td", {}, m.reloads),
      el("td", {}, sum("requests")),
      el("td", {}, sum("errors")));
  });
  fill("modules", rows, 8, "no modules");
}

function progressBar(job) {
  const p = job.progress;
  const share = p && p.total > 0 ? Math.min(1, Math.max(0, p.done / p.total)) : 0;
  const percent = Math.round(share * 100);
  return el("div", {},
    el("div", { class: "bar", role: "progressbar", "aria-valuenow": percent,
      "aria-valuemin": 0, "aria-valuemax": 100 },
    el("span", { style: `width: ${percent}%` }), el("em", {}, p ? `${percent}%` : "...")),
    p && p.message ? el("div", { class: "progress-message" }, p.message) : null);
}

async function act(path, button) {
  button.disabled = true;
  try {
    await api(path, { method: "POST" });
    await refresh();
  } catch (error) {
    button.disabled = false;
    button.title = error.message;
  }
}

// Where a waiting job stands: due later (delayed, or backing off before a retry), held
// for the job it runs after, or its place among the ready jobs.
function standing(job, now) {
  if (job.run_at > now + 0.5) {
    const at = new Date(job.run_at * 1000);
    const sameDay = at.toDateString() === new Date().toDateString();
    const clock = sameDay ? at.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
      : at.toLocaleString([], { weekday: "short", hour: "2-digit", minute: "2-digit" });
    return el("span", { class: "due", title: at.toLocaleString() },
      `due in ${ago(job.run_at - now)} (${clock})`);
  }
  if (job.position !== null && job.position !== undefined) {
    return job.position === 0 ? "next" : `#${job.position + 1}`;
  }
  if (job.after) return `after job${job.after.length > 1 ? "s" : ""} ${job.after.join(", ")}`;
  return "-";
}

// The module, and the job's name and tags when it was given them.
function jobModule(j) {
  return el("td", {}, j.module,
    j.name ? el("span", { class: "job-name" }, ` ${j.name}`) : null,
    ...(j.tags || []).map((t) => el("span", { class: "tag" }, t)));
}

function finishedRow(j, now) {
  const outcome = j.state === "done" ? "done" : `${j.state} (${j.status})`;
  const retry = j.state === "failed" || j.state === "cancelled";
  return el("tr", { "data-job": j.id, class: `job-${j.state}` },
    el("td", {}, j.id), jobModule(j),
    el("td", {}, el("span", { class: `outcome ${j.state}` }, outcome)),
    el("td", { class: "duration" }, ago(j.duration)),
    el("td", {}, `${ago(now - j.finished)} ago`),
    el("td", {}, j.error ? el("pre", { class: "error" }, j.error) : ""),
    el("td", {}, retry ? el("button", { onclick: (e) => act(`/jobs/${j.id}:retry`, e.target) },
      "Retry") : ""));
}

function drawQueue(jobs, finished, queue) {
  const now = Date.now() / 1000;
  fill("running", jobs.running.map((j) => el("tr", { "data-job": j.id, class: "job-running" },
    el("td", {}, j.id), jobModule(j), el("td", {}, progressBar(j)),
    el("td", {}, ago(j.duration)),
    el("td", {}, el("button", { onclick: (e) => act(`/jobs/${j.id}:cancel`, e.target) },
      "Cancel")))), 5, "nothing running");
  fill("waiting", jobs.waiting.map((j) => el("tr", { "data-job": j.id, class: "job-waiting" },
    el("td", {}, j.id), jobModule(j), el("td", {}, j.priority),
    el("td", {}, standing(j, now)), el("td", {}, ago(now - j.created)))), 5,
  "nothing waiting");
  const recent = [...jobs.failed, ...finished.done, ...finished.cancelled]
    .sort((a, b) => b.finished - a.finished).slice(0, RECENT);
  fill("finished", recent.map((j) => finishedRow(j, now)), 7,
    "no finished jobs kept (results are kept for [queue] keep_results)");
  const c = queue.counts;
  document.getElementById("queue-counts").textContent =
    `${c.waiting} waiting · ${c.running} running · ${c.done} done · ${c.failed} failed` +
    ` · ${queue.workers} workers`;
}

function clock(when) {
  if (when === null || when === undefined) return "-";
  return new Date(when * 1000).toLocaleString([], { weekday: "short", month: "short",
    day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

function drawSchedules(schedules) {
  const now = Date.now() / 1000;
  fill("schedules", schedules.map((s) => el("tr", { "data-schedule": s.name },
    el("td", {}, s.name), el("td", {}, s.module),
    el("td", {}, s.cron ? `${s.cron} (${s.tz})` : `every ${ago(s.every)}`),
    el("td", { class: "next-run" }, s.paused ? "paused"
      : `${clock(s.next_run)} (in ${ago(s.next_run - now)})`),
    el("td", {}, s.last_slot ? `${ago(now - s.last_slot)} ago` : "-"),
    el("td", {},
      el("button", { onclick: (e) => act(`/schedules/${s.name}:${s.paused ? "resume" : "pause"}`,
        e.target) }, s.paused ? "Resume" : "Pause"),
      el("button", { onclick: (e) => act(`/schedules/${s.name}:run`, e.target) }, "Run now")))),
  6, "no schedules ([[schedule]] in service.config, or queue:schedule)");
}

// The busy-time chart: a day x hour grid (local time), each cell as dark as the share of
// the workers' time spent running jobs in that hour, from the queue's run history.
function drawChart(stats) {
  const SVG = "http://www.w3.org/2000/svg";
  const cell = 26, gap = 2, left = 80, top = 18;
  const workers = Math.max(1, stats.workers);
  const busy = new Map(stats.window.by_hour.map((h) => [h.hour, h]));
  const today = new Date();
  today.setHours(0, 0, 0, 0);
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("id", "busy-chart");
  svg.setAttribute("width", left + 24 * (cell + gap));
  svg.setAttribute("height", top + DAYS * (cell + gap) + 4);
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
        `${runs} runs (${Math.round(share * 100)}% of ${workers} workers)`;
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
    `${ago(total)} busy in ${stats.window.runs} runs; quietest hours: ${quiet.join(", ")}`;
}

// --- polling ----------------------------------------------------------------------------

let lastChart = 0;

async function refresh() {
  const status = document.getElementById("status");
  try {
    const wantChart = Date.now() - lastChart > CHART_MS;
    const [modules, stats, jobs, done, cancelled, queue] = await Promise.all([
      api("/modules"), api("/stats"), api("/jobs?page_size=50"),
      api(`/jobs?state=done&page_size=${RECENT}`),
      api(`/jobs?state=cancelled&page_size=${RECENT}`),
      api(`/queue/stats?window=${wantChart ? DAYS * 86400 : 60}`),
    ]);
    // 503 for a moment after the start (schedules not loaded yet): shown next time.
    const schedules = await api("/schedules").catch(() => ({ schedules: [] }));
    drawSchedules(schedules.schedules);
    drawSummary(stats, queue);
    drawModules(modules.modules, stats);
    drawQueue(jobs.jobs, { done: done.jobs.done, cancelled: cancelled.jobs.cancelled }, queue);
    if (wantChart) {
      drawChart(queue);
      lastChart = Date.now();
    }
    status.textContent = `updated ${new Date().toLocaleTimeString()}`;
    status.className = "status";
  } catch (error) {
    status.textContent = `not updated: ${error.message}`;
    status.className = "status down";
  }
}

document.getElementById("login").addEventListener("submit", (event) => {
  event.preventDefault();
  token = document.getElementById("token").value;
  localStorage.setItem("bgservice-token", token);
  document.getElementById("login").hidden = true;
  lastChart = 0;
  refresh();
});

refresh();
setInterval(refresh, POLL_MS);
