// stationctl dashboard: three pages (fleet, station, alarms) over the JSON API, kept live
// by Server-Sent Events (/api/live). Plain JavaScript, no build step.
"use strict";

const $ = (sel, root) => (root || document).querySelector(sel);
const esc = s => String(s ?? "").replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
const COLORS = { slots: "#3b6fd6", meter: "#e07b00", grid: "#8a5cd6" };

// ---- formatting (the API speaks the contract's integer units) ----------------------------
function fmtW(w) {
  if (w === null || w === undefined) return "–";
  return Math.abs(w) >= 1000 ? (w / 1000).toFixed(2) + " kW" : Math.round(w) + " W";
}
const kwh = mwh => (mwh / 1e6).toFixed(mwh >= 1e8 ? 1 : 2);
// energy with a unit that suits it: Wh below 1 kWh (a demo's first minutes, one session)
const energy = mwh => Math.abs(mwh) < 1e6 ? Math.round(mwh / 1000) + " Wh" : kwh(mwh) + " kWh";
// short axis labels
const axisW = w => w >= 1000 ? +(w / 1000).toFixed(1) + " kW" : Math.round(w) + " W";
const axisKwh = mwh => mwh >= 1e6 ? +(mwh / 1e6).toPrecision(3) + " kWh" : +(mwh / 1000).toPrecision(3) + " Wh";
function dur(ms) {
  const m = Math.max(0, Math.round(ms / 60000));
  return m < 60 ? m + " min" : Math.floor(m / 60) + " h " + String(m % 60).padStart(2, "0") + " min";
}
const fmtKwh = mwh => mwh === null || mwh === undefined ? "–" : energy(mwh);
const pct = p => p === null || p === undefined ? "–" : (p / 10).toFixed(1) + " %";
const degC = t => t === null || t === undefined ? "–" : (t / 10).toFixed(1) + " °C";
const volts = mv => mv === null || mv === undefined ? "–" : (mv / 1000).toFixed(1) + " V";
const amps = ma => ma === null || ma === undefined ? "–" : (ma / 1000).toFixed(1) + " A";
function ago(ms, now) {
  if (!ms) return "never";
  const s = Math.max(0, Math.round((now - ms) / 1000));
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.floor(s / 60) + " min ago";
  if (s < 86400) return Math.floor(s / 3600) + " h ago";
  return Math.floor(s / 86400) + " d ago";
}
const clock = t => new Date(t).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
const dayLabel = t => new Date(t).toISOString().slice(5, 10);
const when = t => t === null || t === undefined ? "–" : new Date(t).toLocaleString();

// ---- the URL query: what a page shows is in it, so a link reproduces the view -----------
const query = () => new URLSearchParams(location.search);
function setQuery(changes) {
  const q = query();
  for (const [k, v] of Object.entries(changes)) {
    if (v === null || v === undefined || v === "") q.delete(k); else q.set(k, v);
  }
  const s = q.toString();
  history.replaceState(null, "", location.pathname + (s ? "?" + s : ""));
}
// the API's query for the view: the page's own keys that it has
function apiQuery(keys, extra) {
  const q = query(), out = new URLSearchParams();
  for (const k of keys) if (q.get(k)) out.set(k, q.get(k));
  for (const [k, v] of Object.entries(extra || {})) if (v !== null && v !== undefined && v !== "") out.set(k, v);
  return out.toString();
}

// the carbon figures' parameter set; a visible mark while it is not validated
function carbonMark(c) {
  if (!c || c.validated) return "";
  return `<span class="carbon-mark" title="The CO₂e figures use parameter set ${esc(c.id)} v${esc(c.version)}, which says it is not validated.">` +
    `example parameters, not validated · ${esc(c.id)} v${esc(c.version)}</span>`;
}

// ---- the time-range picker (from/to UTC days, presets), kept in the URL ------------------
const isoDay = t => new Date(t).toISOString().slice(0, 10);
const addDays = (day, n) => isoDay(Date.parse(day + "T00:00:00Z") + n * 86400000);
function rangePicker(onChange) {
  const el = $("#range");
  el.innerHTML = `<label>From <input type="date" id="range-from"></label>
    <label>To <input type="date" id="range-to"></label>
    <span class="presets">${[["today", "Today"], ["7d", "7 days"], ["30d", "30 days"], ["month", "This month"]]
      .map(([k, t]) => `<button type="button" data-preset="${k}">${t}</button>`).join("")}</span>`;
  let today = null;
  const set = (from, to) => { setQuery({ from, to, offset: null }); onChange(); };
  el.addEventListener("change", () => {
    const f = $("#range-from").value, t = $("#range-to").value;
    if (f && t && f <= t) set(f, t);
  });
  el.addEventListener("click", ev => {
    const b = ev.target.closest("button[data-preset]");
    if (!b || !today) return;
    const p = b.dataset.preset;
    const from = p === "today" ? today : p === "7d" ? addDays(today, -6) : p === "30d" ? addDays(today, -29) : today.slice(0, 8) + "01";
    $("#range-from").value = from; $("#range-to").value = today;
    set(from, today);
  });
  // the answer's range (the server's default when the URL has none) and the stations' today
  return d => {
    today = d.today;
    $("#range-from").value = d.from; $("#range-to").value = d.to;
    el.dataset.today = d.today;
  };
}

// a station filter (select) over the fleet's station ids, kept in the URL as sid
function stationSelect(onChange) {
  const sel = $("#sid");
  getJSON("/api/fleet").then(d => {
    const cur = query().get("sid") || "";
    sel.innerHTML = `<option value="">All stations</option>` +
      d.stations.map(s => `<option value="${esc(s.sid)}"${s.sid === cur ? " selected" : ""}>${esc(s.sid)}</option>`).join("");
  }).catch(() => {});
  sel.addEventListener("change", () => { setQuery({ sid: sel.value, offset: null }); onChange(); });
}

// a history page's load(), its failure shown on the page (a bad date in the URL: the reason)
function guarded(load) {
  return () => load().then(() => { $("#load-error").hidden = true; }).catch(e => {
    const el = $("#load-error");
    el.textContent = String(e.message || e);
    el.hidden = false;
  });
}

function pager(el, d, onChange) {
  const first = d.total ? d.offset + 1 : 0, last = d.offset + (d.sessions || d.items).length;
  el.innerHTML = `<span class="muted" id="pager-count">${first}–${last} of ${d.total}</span>
    <button type="button" data-go="${Math.max(0, d.offset - d.limit)}"${d.offset > 0 ? "" : " disabled"}>Newer</button>
    <button type="button" data-go="${d.offset + d.limit}"${last < d.total ? "" : " disabled"}>Older</button>`;
  el.onclick = ev => {
    const b = ev.target.closest("button[data-go]");
    if (!b || b.disabled) return;
    setQuery({ offset: b.dataset.go === "0" ? null : b.dataset.go });
    onChange();
  };
}

function toLogin() {
  location.assign("/login?next=" + encodeURIComponent(location.pathname));
}

async function getJSON(url) {
  const r = await fetch(url, { cache: "no-store" });
  if (r.status === 401) toLogin();
  if (!r.ok) {
    const why = await r.json().then(b => b.error).catch(() => null);
    throw new Error(why || `${url}: HTTP ${r.status}`);
  }
  return r.json();
}

// ---- who is logged in (GET /api/me; user null: a dashboard without login) ---------------
const ROLES = ["viewer", "operator", "admin"];
let ME = null;
const may = role => ME !== null && ROLES.indexOf(ME.role) >= ROLES.indexOf(role);

async function loadMe() {
  const r = await fetch("/api/me", { cache: "no-store" });
  if (r.status === 401) { toLogin(); return; }
  if (!r.ok) return;
  const me = await r.json();
  if (!me.user) return;
  ME = me;
  $("#user-name").textContent = `${ME.user} (${ME.role})`;
  $("#logout").hidden = ME.via !== "session";
  $("#userbar").hidden = false;
}

// a state-changing request: JSON, with the session's CSRF token
function postJSON(url, obj) {
  return fetch(url, {
    method: "POST", cache: "no-store", credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": ME ? ME.csrf || "" : "" },
    body: JSON.stringify(obj),
  });
}

async function logout() {
  await postJSON("/logout", {});
  location.assign("/login");
}

// ---- live updates ---------------------------------------------------------------------
function live(topic, onData) {
  const conn = $("#conn");
  const es = new EventSource("/api/live?topic=" + encodeURIComponent(topic));
  es.onopen = () => { conn.textContent = "live"; conn.className = "conn live"; };
  es.onerror = () => {
    conn.textContent = "reconnecting…"; conn.className = "conn wait";
    fetch("/api/me", { cache: "no-store" }).then(r => { if (r.status === 401) toLogin(); }).catch(() => {});
  };
  es.onmessage = ev => {
    conn.textContent = "live"; conn.className = "conn live";
    try {
      const d = JSON.parse(ev.data);
      setAgent(d.agent);
      onData(d);
    } catch (e) { console.error(e); }
  };
  return es;
}

// the agent failing or silent: one line above every page (agent/health.py banner())
function setAgent(a) {
  const b = $("#agent-banner");
  const text = a && a.banner;
  b.hidden = !text;
  b.textContent = text || "";
}

function setBadge(alarms) {
  const b = $("#alarm-badge");
  const n = alarms.filter(a => a.level === "crit").length;
  b.hidden = n === 0;
  b.textContent = n;
}

// ---- power history kept in the page, fed by the live payload's "point" -------------------
class PowerSeries {
  constructor(minutes) { this.minutes = minutes; this.points = []; }
  load(points) { this.points = points.slice(); }
  add(p) {
    if (!p) return;
    const last = this.points[this.points.length - 1];
    if (last && last[0] === p[0]) this.points[this.points.length - 1] = p;
    else if (!last || last[0] < p[0]) this.points.push(p);
    const cut = p[0] - this.minutes * 60000;
    while (this.points.length && this.points[0][0] < cut) this.points.shift();
  }
  draw(container, now, bucketS) {
    const slots = this.points.map(p => [p[0], p[1]]);
    const meter = this.points.filter(p => p[2] !== null).map(p => [p[0], p[2]]);
    const series = [{ name: "slots (charger output)", color: COLORS.slots, points: slots }];
    if (meter.length) series.push({ name: "grid meter", color: COLORS.meter, points: meter });
    // the window grows from 5 min to the whole span as history accumulates
    const first = this.points.length ? this.points[0][0] : now;
    const t0 = Math.max(now - this.minutes * 60000, Math.min(first, now - 5 * 60000));
    Chart.line(container, series, { t0, t1: now, yfmt: axisW, gap: Math.max(60000, bucketS * 4000) });
  }
}

// rows: [[start ms, slots mWh, grid mWh]]: two metering points of the same energy, side by side
const ENERGY_SERIES = [{ name: "slots (battery side)", color: COLORS.slots }, { name: "grid meter", color: COLORS.grid }];
function drawEnergy(container, rows) {
  Chart.bars(container, rows, ENERGY_SERIES, { label: Chart.hhmm, yfmt: axisKwh });
}
function drawDaily(container, rows) {
  Chart.bars(container, rows, ENERGY_SERIES, { label: dayLabel, yfmt: axisKwh });
}

// acknowledgement (the alarms page only): who and when, or a button for operators
function ackPart(a) {
  if (a.acked_by) return `<span class="acked" data-acked-by="${esc(a.acked_by)}">acknowledged by ${esc(a.acked_by)} at ${esc(clock(a.acked_at))}</span>`;
  if (a.acked_by === null && may("operator")) return `<button type="button" class="ack" data-ack="${esc(a.id)}" data-since="${a.since_ms}">Acknowledge</button>`;
  return "";
}

function alarmItem(a, now, withSid, withAck) {
  const where = (withSid && a.sid ? `<a href="/stations/${esc(a.sid)}">${esc(a.sid)}</a> · ` : "") + (a.slot ? `slot ${a.slot} · ` : "");
  return `<li class="${esc(a.level)}" data-alarm-id="${esc(a.id)}">${withAck ? ackPart(a) : ""}<span class="when">since ${esc(clock(a.since_ms))}</span>` +
    `<b>${esc(a.code)}</b> · ${where}${esc(a.msg)}</li>`;
}

function alarmList(alarms, now, withSid, withAck) {
  if (!alarms.length) return `<li class="none">No active alarm</li>`;
  return alarms.map(a => alarmItem(a, now, withSid, withAck)).join("");
}

function eventList(events, withSid) {
  if (!events.length) return `<li class="none">Nothing reported</li>`;
  return events.map(e => `<li class="${esc(e.level === "crit" ? "crit" : e.level === "info" ? "info" : "warn")}">` +
    `<span class="when">${esc(new Date(e.t).toLocaleString())}</span><b>${esc(e.code)}</b> · ` +
    (withSid && e.sid ? `<a href="/stations/${esc(e.sid)}">${esc(e.sid)}</a> · ` : "") +
    (e.slot ? `slot ${e.slot} · ` : "") + `${esc(e.msg)} <span class="muted">(${esc(e.source)})</span></li>`).join("");
}

// ---- fleet page -------------------------------------------------------------------------
const STATES = ["online", "silent", "offline", "unknown"];
// an OCPP charger (CONTRACT §11) beside the project's own stations: its mark
const sourcePill = s => s.mark ? ` <span class="pill ocpp" data-field="source" title="OCPP charger: unsigned unless its meter signs (OCMF)">${esc(s.mark)}</span>` : "";
// record flags as badges: "unsigned" (an OCPP meter value no signature vouches for) stands out
const FLAG_TITLES = { unsigned: "from an OCPP charger whose meter values are not signed (OCMF)", ocpp: "from an OCPP charger" };
function flagPills(flags, cls) {
  return flags.map(f => `<span class="pill ${f === "unsigned" ? "unsigned" : f === "ocpp" ? "ocpp" : cls(f)}" data-flag="${esc(f)}"${FLAG_TITLES[f] ? ` title="${FLAG_TITLES[f]}"` : ""}>${esc(f === "ocpp" ? "OCPP" : f)}</span>`).join(" ");
}
// the rows of the fleet table: text (a substring of the id, any case), state, then a stable
// sort (ties in station id order): the rules of agent/dashboard/history.py filter_stations
function filterSort(stations, v) {
  const text = v.q.toUpperCase();
  const rank = x => STATES.includes(x) ? STATES.indexOf(x) : STATES.length;
  const keys = {
    sid: s => s.sid, state: s => rank(s.state), power: s => s.power_w ?? -Infinity,
    today: s => s.today_mwh, alarms: s => [s.alarms.crit, s.alarms.warn],
  };
  const key = keys[v.sort] || keys.sid, sign = v.dir === "desc" ? -1 : 1;
  const cmp = (a, b) => Array.isArray(a) ? (cmp(a[0], b[0]) || cmp(a[1], b[1])) : a < b ? -1 : a > b ? 1 : 0;
  return stations.slice().sort((a, b) => cmp(a.sid, b.sid))
    .filter(s => s.sid.toUpperCase().includes(text) && (!v.state || s.state === v.state) &&
      (!v.source || (s.source || "own") === v.source))
    .sort((a, b) => sign * cmp(key(a), key(b)));
}

function fleetPage(main) {
  main.innerHTML = `
    <section class="cards" id="totals"></section>
    <section class="panel"><h2>Stations</h2>
      <div class="toolbar">
        <input type="search" id="st-filter" placeholder="Filter by station id" aria-label="Filter by station id">
        <select id="st-state" aria-label="State"><option value="">All states</option>
          ${STATES.map(x => `<option value="${x}">${x}</option>`).join("")}</select>
        <select id="st-source" aria-label="Source"><option value="">All sources</option>
          <option value="own">own</option><option value="ocpp">OCPP</option></select>
        <span class="muted" id="st-count"></span>
        <a id="csv" class="csv" href="/api/fleet?format=csv" download>Download CSV</a>
      </div>
      <div class="table-wrap"><table id="stations">
      <thead><tr><th data-sort="sid">Station</th><th data-sort="state">State</th><th class="opt">Last seen</th><th class="num" data-sort="power">Power</th>
      <th class="num opt">Charging</th><th class="num" data-sort="today">Today</th><th class="num opt">CO₂e today <span id="co2e-col-mark"></span></th><th class="opt">Firmware</th><th class="num" data-sort="alarms">Alarms</th></tr></thead>
      <tbody></tbody></table></div></section>
    <section class="panel"><h2>Active alarms</h2><ul class="alarms" id="alarms"></ul></section>
    <section class="grid3 charts">
      <div class="panel"><h2>Fleet power, last hour</h2><div class="chart" id="chart-power"></div></div>
      <div class="panel"><h2>Energy per interval · station clock</h2><div class="chart" id="chart-energy"></div></div>
      <div class="panel"><h2>Energy per UTC day · station clock</h2><div class="chart" id="chart-daily"></div></div>
    </section>
    <p class="note" id="carbon-note"></p>`;
  const power = new PowerSeries(60);
  let last = null, bucket = 5;
  getJSON("/api/power?minutes=60").then(d => { bucket = d.bucket_s; power.load(d.points); if (last) power.draw($("#chart-power"), last.now, bucket); });
  const charts = () => {
    getJSON("/api/energy").then(d => drawEnergy($("#chart-energy"), d.points));
    getJSON("/api/daily").then(d => drawDaily($("#chart-daily"), d.points));
  };
  charts();
  setInterval(charts, 30000);
  // filter and sort (client-side over the live payload; the same rules as the API's
  // /api/fleet?q=&state=&sort=&dir=, which the CSV link asks)
  const q0 = query();
  $("#st-filter").value = q0.get("q") || "";
  $("#st-state").value = q0.get("state") || "";
  $("#st-source").value = q0.get("source") || "";
  const view = () => ({ q: $("#st-filter").value.trim(), state: $("#st-state").value, source: $("#st-source").value,
                        sort: query().get("sort") || "sid", dir: query().get("dir") || "asc" });
  const rerender = () => {
    const v = view();
    setQuery({ q: v.q, state: v.state, source: v.source, sort: v.sort === "sid" ? null : v.sort, dir: v.dir === "asc" ? null : v.dir });
    $("#csv").href = "/api/fleet?" + apiQuery(["q", "state", "source", "sort", "dir"], { format: "csv" });
    for (const th of document.querySelectorAll("#stations th[data-sort]")) {
      th.classList.toggle("sorted", th.dataset.sort === v.sort);
      th.dataset.dir = th.dataset.sort === v.sort ? v.dir : "";
    }
    if (last) drawStations(last);
  };
  $("#st-filter").addEventListener("input", rerender);
  $("#st-state").addEventListener("change", rerender);
  $("#st-source").addEventListener("change", rerender);
  $("#stations thead").addEventListener("click", ev => {
    const th = ev.target.closest("th[data-sort]");
    if (!th) return;
    const v = view();
    setQuery({ sort: th.dataset.sort, dir: v.sort === th.dataset.sort && v.dir === "asc" ? "desc" : "asc" });
    rerender();
  });
  // an update in progress or gone wrong shows beside the version (confirmed: nothing to say)
  const otaPill = o => !o || o.phase === "confirmed" ? "" :
    ` <span class="pill ${o.phase === "rolled_back" || o.phase === "refused" ? "warn" : "info"}" data-field="ota"
      title="${esc([o.from, o.to].filter(Boolean).join(" → ") + (o.why ? " (" + o.why + ")" : ""))}">${esc(o.phase.replace("_", " "))}</span>`;
  const drawStations = d => {
    const rows = filterSort(d.stations, view());
    $("#st-count").textContent = rows.length === d.stations.length ? `${rows.length} stations` : `${rows.length} of ${d.stations.length} stations`;
    $("#stations tbody").innerHTML = rows.map(s => `
      <tr data-sid="${esc(s.sid)}" data-source="${esc(s.source || "own")}" class="state-${esc(s.state)}">
        <td><a href="/stations/${esc(s.sid)}">${esc(s.sid)}</a>${sourcePill(s)}</td>
        <td><span class="pill ${esc(s.state)}">${esc(s.state)}</span></td>
        <td class="opt" data-field="last-seen">${esc(ago(s.last_seen_ms, d.now))}</td>
        <td class="num" data-field="power" data-value="${s.power_w ?? ""}">${fmtW(s.power_w)}</td>
        <td class="num opt">${s.charging} / ${s.slots}</td>
        <td class="num" data-field="today" data-value="${s.today_mwh}">${fmtKwh(s.today_mwh)}</td>
        <td class="num opt">${s.co2e_today_kg === null ? "–" : esc(s.co2e_today_kg) + " kg"}</td>
        <td class="opt" data-field="fw">${esc(s.fw ?? "–")}${otaPill(s.ota)}</td>
        <td class="num">${s.alarms.crit ? `<span class="pill crit">${s.alarms.crit}</span>` : ""}${s.alarms.warn ? ` <span class="pill warn">${s.alarms.warn}</span>` : ""}</td>
      </tr>`).join("") || `<tr><td colspan="9" class="muted">${d.stations.length ? "No station matches the filter." : "No station has reported yet."}</td></tr>`;
  };
  rerender();
  live("fleet", d => {
    last = d;
    const t = d.totals;
    const crit = d.alarms.filter(a => a.level === "crit").length, warn = d.alarms.length - crit;
    $("#totals").innerHTML = `
      <div class="card"><div class="k">Stations online</div><div class="v" id="t-online">${t.online}<small> / ${t.stations}</small></div></div>
      <div class="card"><div class="k">Charging now</div><div class="v" id="t-power" data-value="${t.power_w}">${fmtW(t.power_w)}</div></div>
      <div class="card"><div class="k">Slots charging</div><div class="v">${t.charging}<small> / ${t.slots}</small></div></div>
      <div class="card"><div class="k">Energy today (UTC)</div><div class="v">${fmtKwh(t.today_mwh)}</div></div>
      <div class="card"><div class="k">CO₂e avoided today</div><div class="v">${esc(t.co2e_today_kg)}<small> kg</small></div>${carbonMark(d.carbon)}</div>
      <div class="card"><div class="k">Active alarms</div><div class="v" id="t-alarms">${crit}<small> crit · ${warn} warn</small></div></div>
      <div class="card"><div class="k">Firmware</div><div class="v small" id="t-versions">${Object.entries(t.versions || {}).map(([v, n]) => `${esc(v)} <small>×${n}</small>`).join(" · ") || "–"}</div></div>`;
    $("#co2e-col-mark").innerHTML = carbonMark(d.carbon) ? `<span class="carbon-mark short" title="example parameters, not validated">not validated</span>` : "";
    drawStations(d);
    $("#alarms").innerHTML = alarmList(d.alarms, d.now, true);
    setBadge(d.alarms);
    power.add(d.point);
    power.draw($("#chart-power"), d.now, bucket);
    if (d.carbon) $("#carbon-note").textContent = `CO₂e from parameter set ${d.carbon.id} v${d.carbon.version}` +
      (d.carbon.placeholders.length ? ` (placeholders: ${d.carbon.placeholders.join(", ")})` : "") + `. ${d.carbon.notice}` +
      (d.carbon.error ? ` Error: ${d.carbon.error}` : "");
  });
}

// ---- station page -----------------------------------------------------------------------
function slotCard(s, clockMs) {
  const b = s.bat, ses = s.session;
  const cls = s.st ? "st-" + s.st : "st-stale";
  return `<div class="slot ${esc(cls)}" data-slot="${s.n}" data-state="${esc(s.st || "")}">
    <div class="head"><span>${s.ocpp_status !== undefined ? "Connector" : "Slot"} ${s.n}</span><span class="state"${s.ocpp_status ? ` title="OCPP status ${esc(s.ocpp_status)}"` : ""}>${esc(s.state)}</span></div>
    <div class="power" data-value="${s.power_w ?? ""}">${fmtW(s.power_w)}</div>
    ${b ? `<div class="soc" title="state of charge"><div style="width:${Math.min(100, b.soc / 10)}%"></div></div>` : ""}
    <dl>
      ${s.ocpp_status !== undefined ? `<dt>OCPP status</dt><dd data-field="ocpp-status">${esc(s.ocpp_status ?? "–")}${s.error ? ` · <span class="pill crit">${esc(s.error)}</span>` : ""}</dd>
      <dt>Meter</dt><dd>${s.signed ? "signed (OCMF)" : `<span class="pill unsigned">unsigned</span>`}</dd>` :
      `<dt>Charger</dt><dd>${volts(s.mv)} · ${amps(s.ma)}</dd>`}
      ${b ? `<dt>Battery</dt><dd>${esc(b.id)}</dd>
      <dt>SoC / SoH</dt><dd>${pct(b.soc)} / ${pct(b.soh)}</dd>
      <dt>Temp</dt><dd title="hottest / coolest cell">${(b.t / 10).toFixed(1)} / ${degC(b.tmin)}</dd>
      <dt>Cycles</dt><dd>${b.cyc}${b.flt ? ` · <span class="pill crit">fault ${b.flt}</span>` : ""}</dd>` :
      (s.st && "WCVFE".includes(s.st) ? `<dt>Battery</dt><dd class="muted">BMS not answering</dd>` : "")}
      <dt>Register</dt><dd>${fmtKwh(s.e_mwh)}</dd>
    </dl>
    ${ses ? `<div class="session">Session ${ses.since_ms && clockMs ? "for " + dur(clockMs - ses.since_ms) : "in progress"} · ${ses.mwh === null ? "–" : energy(ses.mwh)}` +
      `${ses.soc0 !== null && b ? ` · SoC ${pct(ses.soc0)} → ${pct(b.soc)}` : ""}</div>` : ""}
  </div>`;
}

function stationPage(main, sid) {
  main.innerHTML = `
    <h1><span>${esc(sid)}</span><span id="st-state" class="pill">…</span><span id="st-source"></span></h1>
    <p class="sub" id="st-sub"></p>
    <section class="cards" id="st-cards"></section>
    <section class="slots" id="slots"></section>
    <section class="grid3 charts">
      <div class="panel"><h2>Power, last hour</h2><div class="chart" id="chart-power"></div></div>
      <div class="panel"><h2>Energy per interval · station clock</h2><div class="chart" id="chart-energy"></div></div>
      <div class="panel"><h2>Energy per UTC day · station clock</h2><div class="chart" id="chart-daily"></div></div>
    </section>
    <section class="panel"><h2>Active alarms</h2><ul class="alarms" id="alarms"></ul></section>
    <section class="panel"><h2>Recent events</h2><ul class="alarms" id="events"></ul></section>
    <section class="panel"><h2>Link error counters (this boot)</h2><div class="table-wrap"><table id="errs"></table></div></section>`;
  const base = "/api/stations/" + encodeURIComponent(sid);
  const power = new PowerSeries(60);
  let last = null, bucket = 5;
  getJSON(base + "/power?minutes=60").then(d => { bucket = d.bucket_s; power.load(d.points); if (last) power.draw($("#chart-power"), last.now, bucket); })
    .catch(() => { $("#st-sub").textContent = "No such station (yet)."; });
  const charts = () => {
    getJSON(base + "/energy").then(d => drawEnergy($("#chart-energy"), d.points)).catch(() => {});
    getJSON(base + "/daily").then(d => drawDaily($("#chart-daily"), d.points)).catch(() => {});
  };
  charts();
  setInterval(charts, 30000);
  live("station:" + sid, d => {
    last = d;
    document.title = `${sid} · stationctl`;
    const pill = $("#st-state");
    pill.textContent = d.state; pill.className = "pill " + d.state;
    $("#st-source").innerHTML = sourcePill(d);
    const oc = d.ocpp || {};
    const tel = d.telemetry;
    $("#st-sub").textContent = [d.mark ? [d.mark + " charger", oc.vendor, oc.model].filter(Boolean).join(" ") : null,
      oc.status ? "charger " + oc.status : null, d.fw ? "firmware " + d.fw : null, d.boot !== null ? "boot " + d.boot : null,
      "last seen " + ago(d.last_seen_ms, d.now), tel && tel.period_ms ? `${d.mark ? "heartbeat" : "telemetry"} every ${(tel.period_ms / 1000).toFixed(0)} s` : null,
      tel && tel.hist ? "newest reading is from the outbox backlog" : null].filter(Boolean).join(" · ");
    const m = d.meter;
    $("#st-cards").innerHTML = `
      <div class="card"><div class="k">Slots power</div><div class="v" id="st-power" data-value="${d.power_w ?? ""}">${fmtW(d.power_w)}</div></div>
      <div class="card"><div class="k">Grid meter power</div><div class="v">${fmtW(d.meter_w)}</div></div>
      <div class="card"><div class="k">Today, slots (UTC)</div><div class="v">${fmtKwh(d.today_mwh)}</div></div>
      <div class="card"><div class="k">Today, grid meter</div><div class="v">${fmtKwh(d.today_grid_mwh)}</div></div>
      <div class="card"><div class="k">CO₂e avoided today</div><div class="v">${d.co2e_today_kg === null ? "–" : esc(d.co2e_today_kg)}<small> kg${d.co2e_point ? " (" + esc(d.co2e_point) + ")" : ""}</small></div>${carbonMark(d.carbon)}</div>
      <div class="card"><div class="k">Meter register</div><div class="v">${m ? (m.e_wh / 1000).toFixed(1) : "–"}<small> kWh</small></div></div>`;
    const slotsEl = $("#slots");
    slotsEl.classList.toggle("stale-view", d.state !== "online");
    slotsEl.dataset.note = d.state !== "online" ? `${d.state}: the last reading, ${ago(d.telemetry ? d.telemetry.recv_ms : null, d.now)}` : "";
    slotsEl.innerHTML = d.slot_list.map(s => slotCard(s, d.clock_ms)).join("") || `<p class="muted">No telemetry yet.</p>`;
    $("#alarms").innerHTML = alarmList(d.alarm_list, d.now, false);
    $("#events").innerHTML = eventList(d.events, false);
    const keys = Object.keys(d.err);
    $("#errs").innerHTML = keys.length ? `<tr>${keys.map(k => `<th class="num">${esc(k)}</th>`).join("")}</tr>` +
      `<tr>${keys.map(k => `<td class="num">${d.err[k]}</td>`).join("")}</tr>` : `<tr><td class="muted">none reported</td></tr>`;
    power.add(d.point);
    power.draw($("#chart-power"), d.now, bucket);
  });
}

// ---- alarms page ------------------------------------------------------------------------
function historyRow(a) {
  const ack = a.acked_by ? `<span class="acked-by" data-acked-by="${esc(a.acked_by)}">${esc(a.acked_by)}</span><br><span class="muted">${esc(when(a.acked_at))}</span>` : `<span class="muted">–</span>`;
  const where = a.sid ? `<a href="/stations/${esc(a.sid)}">${esc(a.sid)}</a>${a.slot ? " · slot " + a.slot : ""}` : "–";
  return `<tr data-id="${esc(a.id)}" data-source="${esc(a.source)}" class="level-${esc(a.level || "info")}">
    <td>${esc(when(a.raised_ms))}</td><td>${a.cleared_ms ? esc(when(a.cleared_ms)) : a.source === "dashboard" ? `<span class="pill crit">active</span>` : "–"}</td>
    <td>${where}</td><td><b>${esc(a.code)}</b>${a.level ? ` <span class="pill ${esc(a.level)}">${esc(a.level)}</span>` : ""}<br><span class="muted wrap">${esc(a.msg)}</span></td>
    <td>${ack}</td><td class="muted">${esc(a.source)}</td></tr>`;
}

function alarmHistory() {
  const run = guarded(load);
  const showRange = rangePicker(run);
  stationSelect(run);
  async function load() {
    const qs = apiQuery(["from", "to", "sid", "offset"], { limit: 50 });
    const d = await getJSON("/api/alarms/history?" + qs);
    showRange(d);
    $("#csv").href = "/api/alarms/history?" + qs + "&format=csv";
    $("#history tbody").innerHTML = d.items.map(historyRow).join("") || `<tr><td colspan="6" class="muted">No alarm in this range.</td></tr>`;
    pager($("#pager"), d, run);
  }
  run();
  setInterval(run, 15000);
  return run;
}

function alarmsPage(main) {
  main.innerHTML = `
    <section class="panel"><h2>Active alarms</h2><ul class="alarms" id="alarms"></ul></section>
    <section class="panel"><h2>Alarm history · raised, cleared, acknowledged</h2>
      <div class="toolbar"><form class="range" id="range" onsubmit="return false"></form>
        <select id="sid" aria-label="Station"></select>
        <a id="csv" class="csv" href="#" download>Download CSV</a></div>
      <p class="load-error" id="load-error" hidden></p>
      <div class="table-wrap"><table id="history"><thead><tr><th>Raised</th><th>Cleared</th><th>Station</th><th>Alarm</th><th>Acknowledged</th><th>Source</th></tr></thead>
      <tbody></tbody></table></div><div class="pager" id="pager"></div></section>
    <section class="panel"><h2>Quarantined messages since the dashboard started</h2><div id="quarantine"></div></section>
    <section class="panel"><h2>Events (newest first)</h2><ul class="alarms" id="events"></ul></section>`;
  $("#alarms").addEventListener("click", async ev => {
    const b = ev.target.closest("button.ack");
    if (!b) return;
    b.disabled = true;
    const r = await postJSON("/api/alarms/ack", { id: b.dataset.ack, since_ms: Number(b.dataset.since) });
    if (r.ok) { b.outerHTML = ackPart(await r.json()); reloadHistory().catch(() => {}); return; }
    b.disabled = false;
    b.title = "HTTP " + r.status;
  });
  const reloadHistory = alarmHistory();
  live("alarms", d => {
    $("#alarms").innerHTML = alarmList(d.active, d.now, true, true);
    setBadge(d.active);
    const q = Object.entries(d.quarantine_total);
    $("#quarantine").innerHTML = q.length ? `<table><tr><th>Reason</th><th class="num">Messages</th></tr>` +
      q.map(([r, n]) => `<tr><td>${esc(r)}</td><td class="num">${n}</td></tr>`).join("") + `</table>` : `<p class="muted">None.</p>`;
    $("#events").innerHTML = eventList(d.events, true);
  });
}

// ---- sessions page: completed charging sessions (session records) -----------------------
function sessionsPage(main) {
  main.innerHTML = `
    <h1>Charging sessions</h1>
    <p class="sub">Completed sessions that started in the range (UTC days, station clock), newest first.</p>
    <section class="panel">
      <div class="toolbar"><form class="range" id="range" onsubmit="return false"></form>
        <select id="sid" aria-label="Station"></select>
        <a id="csv" class="csv" href="#" download>Download CSV</a></div>
      <p class="load-error" id="load-error" hidden></p>
      <div class="table-wrap"><table id="sessions"><thead><tr><th>Station</th><th class="num">Slot</th><th>Battery</th>
        <th>Start</th><th>End</th><th class="num">Duration</th><th class="num">Energy</th><th class="num">SoC</th><th>Reason</th><th>Flags</th></tr></thead>
        <tbody></tbody></table></div>
      <div class="pager" id="pager"></div></section>`;
  const run = guarded(load);
  const showRange = rangePicker(run);
  stationSelect(run);
  async function load() {
    const qs = apiQuery(["from", "to", "sid", "offset"], { limit: 50 });
    const d = await getJSON("/api/sessions?" + qs);
    showRange(d);
    $("#csv").href = "/api/sessions?" + qs + "&format=csv";
    $("#sessions tbody").innerHTML = d.sessions.map(x => `
      <tr data-sid="${esc(x.sid)}" data-slot="${x.slot}" data-start="${esc(new Date(x.start_ms).toISOString())}">
        <td><a href="/stations/${esc(x.sid)}">${esc(x.sid)}</a></td><td class="num">${x.slot}</td><td>${esc(x.bat ?? "–")}</td>
        <td>${esc(when(x.start_ms))}</td><td>${esc(when(x.end_ms))}</td><td class="num">${dur(x.duration_ms)}</td>
        <td class="num" data-mwh="${x.mwh}">${energy(x.mwh)}</td><td class="num">${pct(x.soc0)} → ${pct(x.soc1)}</td>
        <td>${esc(x.why ?? "")}</td><td>${flagPills(x.flags, () => "warn")}</td></tr>`).join("") ||
      `<tr><td colspan="10" class="muted">No completed session in this range.</td></tr>`;
    pager($("#pager"), d, run);
  }
  run();
}

// ---- energy page: kWh per station and UTC day, with incomplete days marked ---------------
function energyPage(main) {
  main.innerHTML = `
    <h1>Energy per day</h1>
    <p class="sub">From the day records (station clock, UTC days). A day is complete when every interval of it has
      interval records without a gap; today never is.</p>
    <section class="panel">
      <div class="toolbar"><form class="range" id="range" onsubmit="return false"></form>
        <select id="sid" aria-label="Station"></select>
        <a id="csv" class="csv" href="#" download>Download CSV</a></div>
      <p class="load-error" id="load-error" hidden></p>
      <section class="cards" id="en-cards"></section>
      <div class="chart" id="chart-days"></div>
    </section>
    <section class="panel"><div class="table-wrap"><table id="days"><thead><tr><th>Station</th><th>Day (UTC)</th>
      <th class="num">Slots (battery side)</th><th class="num">Grid meter</th><th class="num">Intervals</th><th>Complete</th>
      <th class="num">CO₂e avoided <span id="co2e-col-mark"></span></th><th>Flags</th></tr></thead><tbody></tbody></table></div></section>`;
  const run = guarded(load);
  const showRange = rangePicker(run);
  stationSelect(run);
  async function load() {
    const qs = apiQuery(["from", "to", "sid"]);
    const d = await getJSON("/api/energy/daily?" + qs);
    showRange(d);
    $("#csv").href = "/api/energy/daily?" + (qs ? qs + "&" : "") + "format=csv";
    const co2 = d.rows.filter(x => x.co2e_kg !== null).reduce((a, x) => a + Number(x.co2e_kg), 0);
    $("#en-cards").innerHTML = `
      <div class="card"><div class="k">Slots (battery side)</div><div class="v">${fmtKwh(d.totals.mwh)}</div></div>
      <div class="card"><div class="k">Grid meter</div><div class="v">${fmtKwh(d.totals.grid_mwh)}</div></div>
      <div class="card"><div class="k">CO₂e avoided</div><div class="v" id="en-co2e">${co2.toFixed(3)}<small> kg</small></div>${carbonMark(d.carbon)}</div>
      <div class="card"><div class="k">Incomplete days</div><div class="v" id="en-incomplete">${d.totals.incomplete}<small> of ${d.rows.length}</small></div></div>`;
    $("#co2e-col-mark").innerHTML = carbonMark(d.carbon) ? `<span class="carbon-mark short" title="example parameters, not validated">not validated</span>` : "";
    // the chart: the shown stations summed per day; a day any station has incomplete is marked
    const byDay = new Map();
    for (const x of d.rows) {
      const v = byDay.get(x.day_ms) || [x.day_ms, 0, 0, 0];
      v[1] += x.mwh; v[2] += x.grid_mwh; v[3] += x.complete ? 0 : 1;
      byDay.set(x.day_ms, v);
    }
    const days = [...byDay.values()].sort((a, b) => a[0] - b[0]);
    Chart.bars($("#chart-days"), days, ENERGY_SERIES, { label: dayLabel, yfmt: axisKwh,
      flag: r => r[3] ? `incomplete for ${r[3]} station${r[3] > 1 ? "s" : ""}` : null });
    $("#days tbody").innerHTML = d.rows.map(x => `
      <tr data-sid="${esc(x.sid)}" data-day="${esc(x.day)}" data-complete="${x.complete}" class="${x.complete ? "" : "incomplete"}">
        <td><a href="/stations/${esc(x.sid)}">${esc(x.sid)}</a></td><td>${esc(x.day)}</td>
        <td class="num">${fmtKwh(x.mwh)}</td><td class="num">${fmtKwh(x.grid_mwh)}</td>
        <td class="num" data-field="intervals">${x.intervals}/${x.intervals_expected}</td>
        <td>${x.complete ? `<span class="pill online">complete</span>` : `<span class="pill warn" title="${x.today ? "today: not over yet" : "intervals without data"}">${x.today ? "today, incomplete" : "incomplete"}</span>`}</td>
        <td class="num">${x.co2e_kg === null ? "–" : esc(x.co2e_kg) + " kg"}</td>
        <td>${flagPills(x.flags, f => f === "gap" ? "warn" : "info")}</td></tr>`).join("") ||
      `<tr><td colspan="8" class="muted">No records in this range.</td></tr>`;
  }
  run();
}

// ---- router -----------------------------------------------------------------------------
(async function route() {
  $("#logout").addEventListener("click", logout);
  await loadMe().catch(() => {});
  const main = $("#main");
  const path = location.pathname;
  const m = path.match(/^\/stations\/([A-Z0-9][A-Z0-9-]{2,31})\/?$/);
  if (m) { stationPage(main, m[1]); return; }
  if (path.startsWith("/alarms")) { $("#nav-alarms").classList.add("here"); alarmsPage(main); return; }
  // the history pages read on request (no live stream): no live indicator
  if (path.startsWith("/sessions")) { $("#nav-sessions").classList.add("here"); $("#conn").hidden = true; sessionsPage(main); return; }
  if (path.startsWith("/energy")) { $("#nav-energy").classList.add("here"); $("#conn").hidden = true; energyPage(main); return; }
  $("#nav-fleet").classList.add("here");
  fleetPage(main);
})();
