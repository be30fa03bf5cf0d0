// The live page: one EventSource on /_sidecar/live; every message is a whole snapshot, rendered in place.
// No polling: the sidecar pushes after calls complete and events happen. The only timer here ticks the
// uptimes shown between pushes, and it runs only while this page is open.
"use strict";

const $ = (id) => document.getElementById(id);
const NS = "http://www.w3.org/2000/svg";
let last = null, receivedAt = 0;

function el(tag, attrs, ...children) {
  const node = tag.startsWith("svg:") ? document.createElementNS(NS, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}
function ms(v) {
  if (v == null) return "-";
  if (v < 1) return v.toFixed(2) + " ms";
  if (v < 10) return v.toFixed(1) + " ms";
  if (v < 1000) return Math.round(v) + " ms";
  return (v / 1000).toFixed(v < 10000 ? 2 : 1) + " s";
}
function pct(rate) { return rate == null ? "-" : Math.round(rate * 100) + "%"; }
function bytes(n) {
  if (n == null) return "-";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(n < 10 ? 1 : 0) : n) + " " + units[i];
}
function duration(s) {
  s = Math.max(0, Math.floor(s));
  const h = Math.floor(s / 3600), m = Math.floor(s / 60) % 60, sec = s % 60;
  return h ? `${h}h ${String(m).padStart(2, "0")}m` : m ? `${m}m ${String(sec).padStart(2, "0")}s` : `${sec}s`;
}
function clock(ts) { return new Date(ts * 1000).toLocaleTimeString([], { hour12: false }); }
function dollars(amount, unknown) {
  if (amount == null || (unknown && !amount)) return "unknown";
  const figure = amount >= 100 ? "$" + amount.toFixed(2) : "$" + amount.toFixed(4);
  return unknown ? figure + "+unknown" : figure;
}
function num(n) { return n == null ? "-" : n.toLocaleString("en-US"); }
function fill(body, rows, empty, cols) {
  body.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: cols, class: "empty", text: empty }))]));
}
function elapsed() { return last ? last.now + (Date.now() - receivedAt) / 1000 : 0; }

function render(doc) {
  last = doc; receivedAt = Date.now();
  const all = doc.summary.all, limits = doc.limits;
  $("calls").textContent = num(all.calls);
  $("calls-sub").textContent = `tokens ${num(all.input_tokens)} in, ${num(all.output_tokens)} out \u00b7 ` +
    `errors ${Object.values(all.errors).reduce((a, b) => a + b, 0)} \u00b7 retries ${all.retries}`;
  $("hit-rate").textContent = pct(all.hit_rate);
  $("hits-sub").textContent = `${num(all.hits)} hits`;
  $("in-flight").textContent = `${limits.in_flight} / ${limits.queued}`;
  $("limit").textContent = "effective limit " + (limits.effective_limit == null ? "none" : limits.effective_limit);
  $("cache-entries").textContent = num(doc.cache.entries) + " entries";
  $("cache-size").textContent = `${bytes(doc.cache.bytes)} on disk, mode ${doc.cache.mode}`;
  $("saved-tokens").textContent = num(all.saved_tokens) + " tokens";
  $("saved-time").textContent = `${all.saved_upstream_s.toFixed(1)} s of upstream time \u00b7 ` +
    `${dollars(all.saved_usd, all.saved_unknown)} not spent`;
  $("spent").textContent = dollars(all.cost_usd, all.cost_unknown);
  $("spent-sub").textContent = `prompt cache read ${num(all.cache_read_tokens)}, written ${num(all.cache_write_tokens)} ` +
    `\u00b7 hit ${pct(all.prompt_cache_ratio)}`;
  renderUpstream(doc.headroom, doc.overload);
  renderAgents(doc.agents);
  renderLatency(doc.summary);
  barChart($("chart-calls"), doc.chart);
  lineChart($("chart-latency"), doc.chart);
  renderEvents(doc.events, doc.active_events);
  renderSessions(doc.sessions);
  tick();
  document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
}

function tick() {
  if (!last) return;
  const now = elapsed();
  $("meta").textContent = `v${last.version} \u00b7 pid ${last.pid} \u00b7 agent ${last.agent} \u00b7 ` +
    `up ${duration(now - last.started)} \u00b7 memory ${Math.round(last.system_memory_percent)}%`;
  for (const cell of document.querySelectorAll("td[data-started]")) cell.textContent = duration(now - Number(cell.dataset.started));
}

// An overload wall (one probe at a time, calls held) and what the upstream says is left of its rate limits.
function renderUpstream(headroom, overload) {
  const walls = (overload && overload.open) || [], banner = $("overloaded");
  banner.hidden = !walls.length;
  banner.textContent = walls.map((w) => `Upstream overloaded: ${w.upstream} has answered ${w.status} to every call ` +
    `for ${duration(w.since_s)}; ${w.held} calls held, one probe at a time (next in ${w.next_probe_in_s} s)`).join(" \u00b7 ");
  const budgets = (headroom && headroom.budgets) || {};
  const rows = Object.entries(budgets).flatMap(([name, buckets]) => Object.entries(buckets).map(([bucket, b]) =>
    el("tr", {}, el("td", { class: "mono", text: name }), el("td", { text: bucket }),
      el("td", { class: "num", text: num(b.remaining) }), el("td", { class: "num", text: num(b.limit) }),
      el("td", { class: "num", text: num(b.reserved) }), el("td", { class: "num", text: b.reset_in_s + " s" }))));
  $("headroom-section").hidden = !rows.length;
  fill($("headroom"), rows, "", 6);
  if (headroom) $("paced").textContent = `paced: ${headroom.holding} held now, ${num(headroom.held)} held in all ` +
    `(${headroom.held_s.toFixed(1)} s)` + (headroom.fleet ? " \u00b7 one budget for the fleet" : "");
}

function renderAgents(agents) {
  fill($("agents"), agents.map((a) => {
    const label = a.state === "exited" ? `exited${a.exit_status == null ? "" : " (" + a.exit_status + ")"}` :
      a.state + (a.restarts ? ` \u00d7${a.restarts}` : "");
    const uptime = a.state === "exited" ? el("td", { class: "num", text: "-" }) : el("td", { class: "num", "data-started": a.started });
    return el("tr", {}, el("td", { class: "mono", text: a.id }), el("td", {}, el("span", { class: "state " + a.state, text: label })),
      el("td", { text: a.pid || "-" }), uptime, el("td", { class: "num", text: a.peak_rss ? bytes(a.peak_rss) : "-" }),
      el("td", { class: "num", text: a.state === "exited" ? "-" : a.cpu_percent.toFixed(1) + "%" }),
      el("td", { class: "cmd", title: a.cmd, text: a.cmd }));
  }), "no agent attached yet", 7);
}

function renderLatency(summary) {
  const rows = Object.entries(summary.groups || {}).map(([name, s]) => [name, s, ""]);
  if (rows.length !== 1) rows.push(["all models", summary.all, "total"]);
  fill($("latency"), rows.map(([name, s, cls]) => el("tr", { class: cls },
    el("td", { text: name }), el("td", { class: "num", text: num(s.calls) }), el("td", { class: "num", text: pct(s.hit_rate) }),
    ...["total", "ttft", "queue", "overhead"].flatMap((phase) =>
      [el("td", { class: "num", text: ms(s[phase].p50) }), el("td", { class: "num", text: ms(s[phase].p95) })]))),
    "no calls yet", 11);
}

const PAD = { left: 54, right: 8, top: 8, bottom: 18 };
function frame(svg) {
  const w = Math.max(200, svg.clientWidth || 900), h = 140;
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.replaceChildren();
  const plot = { x: PAD.left, y: PAD.top, w: w - PAD.left - PAD.right, h: h - PAD.top - PAD.bottom };
  svg.append(el("svg:line", { class: "axis", x1: plot.x, x2: plot.x + plot.w, y1: plot.y + plot.h, y2: plot.y + plot.h }));
  for (const [frac, label] of [[0, "-15 min"], [1 / 3, "-10 min"], [2 / 3, "-5 min"], [1, "now"]]) {
    svg.append(el("svg:text", { class: "tick", x: plot.x + frac * plot.w, y: plot.y + plot.h + 14,
      "text-anchor": frac === 0 ? "start" : frac === 1 ? "end" : "middle", text: label }));
  }
  return plot;
}
function gridline(svg, plot, y, label) {
  svg.append(el("svg:line", { class: "axis", x1: plot.x, x2: plot.x + plot.w, y1: y, y2: y }),
    el("svg:text", { class: "tick", x: plot.x - 6, y: y + 4, "text-anchor": "end", text: label }));
}

function barChart(svg, chart) {
  const plot = frame(svg), n = chart.calls.length, step = plot.w / n;
  const top = Math.max(1, ...chart.calls);
  gridline(svg, plot, plot.y, String(top));
  chart.calls.forEach((calls, i) => {
    if (!calls) return;
    const x = plot.x + i * step + step * 0.1, bw = Math.max(1, step * 0.8);
    const hits = chart.hits[i], hh = (hits / top) * plot.h, mh = ((calls - hits) / top) * plot.h;
    const base = plot.y + plot.h;
    if (mh) svg.append(el("svg:rect", { class: "miss", x, width: bw, y: base - hh - mh, height: mh }));
    if (hh) svg.append(el("svg:rect", { class: "hit", x, width: bw, y: base - hh, height: hh }));
  });
}

function lineChart(svg, chart) {
  const plot = frame(svg), n = chart.p50.length, step = plot.w / n;
  const values = chart.p50.concat(chart.p95).filter((v) => v != null && v > 0);
  if (!values.length) return;
  const lo = Math.floor(Math.log10(Math.min(...values))), hi = Math.max(lo + 1, Math.ceil(Math.log10(Math.max(...values))));
  const y = (v) => plot.y + plot.h - ((Math.log10(Math.max(v, 10 ** lo)) - lo) / (hi - lo)) * plot.h;
  const tickLabel = (v) => (v >= 1000 ? `${v / 1000} s` : `${v} ms`);
  for (let d = lo; d <= hi; d++) gridline(svg, plot, y(10 ** d), tickLabel(+(10 ** d).toPrecision(1)));
  for (const series of ["p95", "p50"]) {
    let path = "", prev = false;
    chart[series].forEach((v, i) => {
      if (v == null || v <= 0) { prev = false; return; }
      const x = plot.x + (i + 0.5) * step;
      path += `${prev ? "L" : "M"}${x.toFixed(1)},${y(v).toFixed(1)} `;
      prev = true;
      svg.append(el("svg:circle", { class: series, cx: x, cy: y(v), r: 2.5 }));
    });
    if (path) svg.append(el("svg:path", { class: series, d: path }));
  }
}

function renderEvents(events, active) {
  const items = events.map((e) => {
    const detail = Object.entries(e).filter(([k]) => !["ts", "kind", "state"].includes(k))
      .map(([k, v]) => `${k}=${typeof v === "object" && v !== null ? JSON.stringify(v) : v}`).join("  ");
    return el("li", {}, el("time", { text: clock(e.ts) }), el("span", { class: "kind", text: e.kind }),
      el("span", { class: "badge " + e.state, text: e.state }), el("span", { class: "detail", title: detail, text: detail }));
  });
  if (active.length) items.unshift(el("li", {}, el("span", { class: "kind", text: "active now" }),
    el("span", { class: "detail", text: active.join(", ") })));
  $("events").replaceChildren(...(items.length ? items : [el("li", { class: "empty", text: "no events" })]));
}

function renderSessions(sessions) {
  fill($("sessions"), sessions.map((s) => el("tr", {},
    el("td", { class: "mono" }, el("a", { href: "/_sidecar/sessions/" + encodeURIComponent(s.id), text: s.id })),
    el("td", { class: "mono", text: s.agent || "-" }), el("td", { text: s.model || "-" }),
    el("td", { class: "num", text: num(s.turns) }), el("td", { class: "num", text: s.updated ? clock(s.updated) : "-" }),
    el("td", { class: "num", text: s.calls ? dollars(s.cost_usd, s.cost_unknown) : "-" }),
    el("td", { class: "num", text: pct(s.prompt_cache_ratio) }))),
    "no conversation checkpointed yet", 7);
}

function connect() {
  const status = $("status"), source = new EventSource("/_sidecar/live");
  source.onopen = () => { status.textContent = "live"; status.className = "status live"; };
  source.onmessage = (message) => render(JSON.parse(message.data));
  source.onerror = () => { status.textContent = "reconnecting"; status.className = "status"; };
}

connect();
setInterval(tick, 1000);
window.addEventListener("resize", () => { if (last) { barChart($("chart-calls"), last.chart); lineChart($("chart-latency"), last.chart); } });
