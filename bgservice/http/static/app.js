// The dashboard: polls the JSON API (docs/http.md) and redraws what changed. No framework,
// no build step, nothing from a CDN: it must work on a host without internet.
"use strict";

// Relative to the page (/dashboard/): behind a proxy serving the service under a sub-path,
// the API is under that sub-path too.
const API = "../api/v1";
const POLL_MS = 2000; // from the end of one poll to the start of the next
const TIMEOUT_MS = 10000; // a request not answered by then: the service is hung or gone
const CHART_MS = 30000;
const RECENT = 15; // finished jobs shown, newest first
const WAITING_SHOWN = 50;
const STORED = "bgservice-token";
const SCOPE_HEADER = "Bgservice-Token-Scope";

// --- the token ------------------------------------------------------------------------

let token = stored();
let scope = null; // what the token may do, as the API says; null: no tokens, all of it

function stored() {
  try {
    return localStorage.getItem(STORED) || "";
  } catch {
    return ""; // storage blocked: asked for each time
  }
}

function keepToken(value) {
  token = value;
  try {
    if (value) localStorage.setItem(STORED, value);
    else localStorage.removeItem(STORED);
  } catch { /* storage blocked: kept for this page only */ }
}

// `#token=...` in the address: taken, kept, and removed from the address bar. A "%" not
// followed by two hex digits is not an escape: taken as typed.
function tokenFromHash() {
  if (!location.hash.startsWith("#token=")) return false;
  const raw = location.hash.slice(7);
  let value = raw;
  try {
    value = decodeURIComponent(raw);
  } catch { /* URIError: as typed */ }
  keepToken(value);
  history.replaceState(null, "", location.pathname + location.search);
  return true;
}

function showLogin(why) {
  $("login-why").textContent = why;
  $("login").hidden = false;
}

// --- talking to the API -----------------------------------------------------------------

async function api(path, options = {}) {
  const sent = token;
  const headers = sent ? { Authorization: "Bearer " + sent } : {};
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), TIMEOUT_MS);
  let response, text;
  try {
    response = await fetch(API + path, { ...options, headers, signal: abort.signal });
    text = await response.text();
  } catch (error) {
    throw new Error(error.name === "AbortError"
      ? `no answer within ${TIMEOUT_MS / 1000} s` : `service unreachable (${error.message})`);
  } finally {
    clearTimeout(timer);
  }
  scope = response.headers.get(SCOPE_HEADER) || (response.ok ? null : scope);
  if (response.status === 401) {
    if (sent && sent === token) keepToken(""); // a wrong or revoked token: not kept
    showLogin(sent ? "The token given was refused: enter the right one ([http] token)."
      : "This service wants a bearer token ([http] token).");
    throw new Error(sent ? "token refused" : "a token is needed");
  }
  let body = null;
  try {
    body = JSON.parse(text);
  } catch { /* not JSON: a proxy's error page, say */ }
  if (!response.ok) {
    throw new Error(body && body.error ? body.error.message
      : `${response.status} ${response.statusText || "error"} (not an answer of the service)`);
  }
  if (body === null) throw new Error(`${response.status}: the reply is not JSON`);
  return body;
}

// --- the parts ------------------------------------------------------------------------

function drawSummary(stats, queue) {
  const items = [
    ["up", ago(stats.uptime)],
    ["requests", num(stats.requests)],
    ["errors", num(stats.errors)],
    ["connections", num(stats.connections.open)],
    ["loop lag", `${stats.loop_lag_ms.last.toFixed(1)} ms`],
    ["finished/min", num(queue.finished_per_minute)],
  ];
  const summary = $("summary");
  const fresh = items.map(([k, v]) => el("div", {}, el("dt", {}, k), el("dd", {}, v)));
  if (summary.innerHTML !== fresh.map((n) => n.outerHTML).join("")) {
    summary.replaceChildren(...fresh);
  }
}

function drawModules(modules, stats) {
  const rows = modules.map((m) => {
    const calls = Object.values(stats.modules[m.name] || {});
    const sum = (key) => calls.reduce((n, row) => n + (row[key] || 0), 0);
    const state = m.error ? "failed" : "loaded";
    return el("tr", { "data-module": m.name, "data-state": state },
      el("td", { class: "long" }, m.name),
      el("td", {},
        el("span", { class: `state ${state}` },
          !m.error ? "loaded" : m.execution ? "reload failed, last good version serving"
            : "failed to load"),
        m.error ? errorBox(m.error) : null),
      el("td", {}, m.execution || "-"),
      el("td", {}, m.accepts.join(", ") || "-"),
      el("td", {}, m.timeout ? `${m.timeout} s` : "-"),
      el("td", {}, num(m.reloads)),
      el("td", {}, num(sum("requests"))),
      el("td", {}, num(sum("errors"))));
  });
  fill("modules", rows, 8, "no modules");
}

function progressBar(job) {
  const p = job.progress;
  const share = p && p.total > 0 ? Math.min(1, Math.max(0, p.done / p.total)) : 0;
  const percent = Math.round(share * 100);
  const done = el("span");
  done.style.width = `${percent}%`; // (through the DOM: the page's CSP refuses style="")
  return el("div", {},
    el("div", { class: "bar", role: "progressbar", "aria-valuenow": percent,
      "aria-valuemin": 0, "aria-valuemax": 100 }, done, el("em", {}, p ? `${percent}%` : "...")),
    p && p.message ? el("div", { class: "progress-message" }, p.message) : null);
}

// --- actions ----------------------------------------------------------------------------

function say(text, kind) {
  setText("message-text", text);
  $("message").className = `message ${kind}`;
  $("message").hidden = false;
}

function unsay() {
  $("message").hidden = true;
}

// The buttons that change things need a token of scope operate (or no tokens at all).
const mayOperate = () => scope === null || scope === "operate";

// One action: asked for (Cancel), its outcome said until dismissed or the next action.
async function act(button, what, path, { ask, done } = {}) {
  if (ask && !window.confirm(ask)) return;
  unsay();
  button.disabled = true;
  try {
    const reply = await api(path, { method: "POST" });
    if (done) say(`${what}: ${done(reply)}`, "ok");
  } catch (error) {
    say(`${what} failed: ${error.message}`, "bad");
  } finally {
    button.disabled = false;
  }
  pollNow();
}

function actionButton(label, onclick) {
  return el("button", { type: "button", onclick: (e) => onclick(e.currentTarget) }, label);
}

// --- the queue --------------------------------------------------------------------------

// Where a waiting job stands: due later (delayed, or backing off before a retry), held by
// its module's rate, held for the job it runs after, or its place among the ready jobs.
function standing(job, now) {
  if (job.run_at > now + 0.5) {
    const at = new Date(job.run_at * 1000);
    return el("span", { class: "due", title: at.toLocaleString() },
      `due in ${ago(job.run_at - now)} (${shortClock(at)})`);
  }
  if (job.throttled_until && job.throttled_until > now) {
    const at = new Date(job.throttled_until * 1000);
    return el("span", { class: "due", title: "[queue] module_rates" },
      `throttled until ${at.toLocaleTimeString()}`);
  }
  if (job.position !== null && job.position !== undefined) {
    return job.position === 0 ? "next" : `#${num(job.position + 1)}`;
  }
  if (job.after) return `after job${job.after.length > 1 ? "s" : ""} ${job.after.join(", ")}`;
  return "-";
}

// The module, and the job's name and tags when it was given them.
function jobModule(j) {
  return el("td", { class: "long" }, j.module,
    j.name ? el("span", { class: "job-name" }, ` ${j.name}`) : null,
    ...(j.tags || []).map((t) => el("span", { class: "tag" }, t)));
}

function runningRow(j) {
  const cancel = j.cancel_requested ? el("span", { class: "cancelling" }, "cancelling...")
    : mayOperate() ? actionButton("Cancel", (b) => act(b, `Cancel of job ${j.id}`,
      `/jobs/${j.id}:cancel`, { ask: `Cancel job ${j.id} (${j.module})? It is running.`,
        done: (r) => (r.state === "cancelling" ? "cancelling" : r.state) }))
      : "";
  return el("tr", { "data-job": j.id, class: "job-running" },
    el("td", {}, j.id), jobModule(j), el("td", {}, progressBar(j)),
    el("td", { class: "ago" }, ago(j.duration)), el("td", {}, cancel));
}

// A failed or cancelled job's buttons: Retry, and, when jobs listed failed because it did
// (424), Retry with dependents: they come back too, after it (docs/queue.md, retry).
function retryButtons(j, dependents) {
  if (!(j.state === "failed" || j.state === "cancelled") || !mayOperate()) return [];
  const retry = (label, query, what) => actionButton(label, (b) => act(b, what,
    `/jobs/${j.id}:retry${query}`, { done: (r) => `job ${r.id} is ${r.state}` }));
  return [retry("Retry", "", `Retry of job ${j.id}`),
    dependents ? retry("Retry with dependents", "?dependents=true",
      `Retry of job ${j.id} and the ${dependents} listed that failed because it did`) : null];
}

function finishedRow(j, now, dependents) {
  const outcome = j.state === "done" ? "done" : `${j.state} (${j.status})`;
  return el("tr", { "data-job": j.id, class: `job-${j.state}` },
    el("td", {}, j.id), jobModule(j),
    el("td", {}, el("span", { class: `outcome ${j.state}` }, outcome)),
    el("td", { class: "duration" }, ago(j.duration)),
    el("td", { class: "ago" }, `${ago(now - j.finished)} ago`),
    el("td", {}, j.error ? errorBox(j.error) : ""),
    el("td", {}, ...retryButtons(j, dependents.get(j.id) || 0)));
}

// How many of ``failed`` failed because each job did: "Dependency: job N failed".
function failedBecause(failed) {
  const counts = new Map();
  for (const j of failed) {
    const m = j.status === 424 && /^Dependency: job (\d+) (failed|cancelled)$/.exec(j.error);
    if (m) counts.set(Number(m[1]), (counts.get(Number(m[1])) || 0) + 1);
  }
  return counts;
}

function drawQueue(jobs, finished, queue) {
  const now = Date.now() / 1000;
  fill("running", jobs.running.map(runningRow), 5, "nothing running");
  fill("waiting", jobs.waiting.map((j) => el("tr", { "data-job": j.id, class: "job-waiting" },
    el("td", {}, j.id), jobModule(j), el("td", {}, j.priority),
    el("td", {}, standing(j, now)), el("td", { class: "ago" }, ago(now - j.created)))), 5,
  "nothing waiting");
  const c = queue.counts;
  setText("waiting-note", c.waiting > jobs.waiting.length
    ? `the first ${num(jobs.waiting.length)} of ${num(c.waiting)}` : "");
  const recent = [...jobs.failed, ...finished.done, ...finished.cancelled]
    .sort((a, b) => b.finished - a.finished).slice(0, RECENT);
  const dependents = failedBecause(jobs.failed);
  fill("finished", recent.map((j) => finishedRow(j, now, dependents)), 7,
    "no finished jobs kept (results are kept for [queue] keep_results)");
  setText("queue-counts", `${num(c.waiting)} waiting · ${num(c.running)} running · ` +
    `${num(c.done)} done · ${num(c.failed)} failed · ${num(c.cancelled)} cancelled · ` +
    `${num(queue.cluster_workers ?? queue.workers)} workers` +
    (queue.cluster_workers > queue.workers ? ` (${num(queue.workers)} on this instance)` : ""));
}

function scheduleButtons(s) {
  if (!mayOperate()) return "";
  const [label, verb] = s.paused ? ["Resume", "resume"] : ["Pause", "pause"];
  const path = `/schedules/${encodeURIComponent(s.name)}`;
  return [
    actionButton(label, (b) => act(b, `${label} of schedule ${s.name}`, `${path}:${verb}`)),
    actionButton("Run now", (b) => act(b, `Run now of schedule ${s.name}`, `${path}:run`,
      { done: (r) => `added job ${r.id}` })),
  ];
}

function drawSchedules(schedules) {
  const now = Date.now() / 1000;
  fill("schedules", schedules.map((s) => el("tr", { "data-schedule": s.name },
    el("td", { class: "long" }, s.name), el("td", { class: "long" }, s.module),
    el("td", {}, s.cron ? `${s.cron} (${s.tz})` : `every ${ago(s.every)}`),
    el("td", { class: "next-run" }, s.paused ? "paused"
      : `${clock(s.next_run)} (in ${ago(s.next_run - now)})`),
    el("td", {}, s.last_slot ? `${ago(now - s.last_slot)} ago` : "-"),
    el("td", {}, ...[scheduleButtons(s)].flat()))),
  6, "no schedules ([[schedule]] in service.config, or queue:schedule)");
}

// --- polling ----------------------------------------------------------------------------

let lastChart = 0;
let lastGood = null; // when the page last showed what the service said

async function refresh() {
  const wantChart = Date.now() - lastChart > CHART_MS;
  // Schedules are a 503 for a moment after the start (not loaded yet): left as they are.
  const [modules, stats, jobs, done, cancelled, queue, schedules] = await Promise.all([
    api("/modules"), api("/stats"), api(`/jobs?page_size=${WAITING_SHOWN}`),
    api(`/jobs?state=done&page_size=${RECENT}`),
    api(`/jobs?state=cancelled&page_size=${RECENT}`),
    api(`/queue/stats?window=${wantChart ? DAYS * 86400 : 60}`),
    api("/schedules").catch(() => null),
  ]);
  if (schedules) drawSchedules(schedules.schedules);
  drawSummary(stats, queue);
  drawModules(modules.modules, stats);
  drawQueue(jobs.jobs, { done: done.jobs.done, cancelled: cancelled.jobs.cancelled }, queue);
  if (wantChart) {
    drawChart(queue);
    lastChart = Date.now();
  }
}

// What is on screen: fresh, or (the service down, hung or refusing) dimmed and said to be
// as of the last good poll.
function shown(error) {
  const status = $("status");
  if (!error) {
    lastGood = new Date();
    status.textContent = `updated ${lastGood.toLocaleTimeString()}` +
      (mayOperate() ? "" : ` (token of scope ${scope}: no actions)`);
    status.className = "status";
    $("main").classList.remove("stale");
    $("footer-token").hidden = !token;
    return;
  }
  status.textContent = lastGood
    ? `not updated since ${lastGood.toLocaleTimeString()}: ${error.message}`
    : `not updated: ${error.message}`;
  status.className = "status down";
  $("main").classList.toggle("stale", lastGood !== null);
}

// One poll at a time: the next starts POLL_MS after the last one ended (a slow service is
// not sent a pile of them), none while the tab is hidden.
let timer = null;
let polling = false;
let again = false;

async function pollNow() {
  if (!$("login").hidden && !token) return; // until a token is given (startOver)
  if (polling) {
    again = true; // (after the one under way: what it reads may predate an action)
    return;
  }
  clearTimeout(timer);
  timer = null;
  polling = true;
  try {
    await refresh();
    shown(null);
  } catch (error) {
    shown(error);
  } finally {
    polling = false;
  }
  if (again) {
    again = false;
    pollNow();
  } else if (!document.hidden) {
    timer = setTimeout(pollNow, POLL_MS);
  }
}

document.addEventListener("visibilitychange", () => {
  if (document.hidden) {
    clearTimeout(timer);
    timer = null;
  } else if (!polling && timer === null) {
    pollNow();
  }
});

function startOver() {
  $("login").hidden = true;
  lastChart = 0;
  pollNow();
}

window.addEventListener("hashchange", () => {
  if (tokenFromHash()) startOver();
});

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  keepToken($("token").value.trim());
  $("token").value = "";
  startOver();
});

$("message-close").addEventListener("click", unsay);

tokenFromHash();
pollNow();
