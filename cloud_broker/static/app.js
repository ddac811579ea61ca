// skyhop's status page: polls /status every second and redraws. No framework, no
// build step, no network beyond the broker itself (cloud_broker/web.py serves this).
"use strict";

const POLL_MS = 1000;
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, text = "") {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== "") node.textContent = text;
  return node;
}

const pct = (x) => (x === null || x === undefined ? "–" : (100 * x).toFixed(1) + " %");
const ms = (x) => (x === null || x === undefined ? "–" : x < 10 ? x.toFixed(2) : x.toFixed(0));

function memory(mem) {
  if (!mem || !mem[1]) return "–";
  return (mem[0] / 1024).toFixed(1) + "/" + (mem[1] / 1024).toFixed(1) + " GiB";
}

// A line chart: series = [{cls, color, points: [[t, v], ...]}], drawn into div `box`.
// Drawn at the box's own pixel width, so that text is never stretched; call it once the
// box is in the page.
function chart(box, series, { yMax = null, yFmt = (v) => String(v), tMin, tMax }) {
  const w = Math.max(200, box.clientWidth), h = 120, left = 44, bottom = 16;
  const values = series.flatMap((s) => s.points.map((p) => p[1])).filter((v) => v !== null);
  const top = yMax ?? Math.max(1, ...values) * 1.1;
  const x = (t) => left + ((t - tMin) / Math.max(1, tMax - tMin)) * (w - left - 4);
  const y = (v) => 4 + (1 - v / top) * (h - bottom - 8);
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  const axis = document.createElementNS(SVG, "path");
  axis.setAttribute("d", `M${left},4 V${h - bottom} H${w}`);
  axis.setAttribute("class", "axis");
  axis.setAttribute("fill", "none");
  svg.append(axis);
  for (const [v, label] of [[top, yFmt(top)], [0, yFmt(0)]]) {
    const t = document.createElementNS(SVG, "text");
    t.setAttribute("x", 2);
    t.setAttribute("y", y(v) + 4);
    t.textContent = label;
    svg.append(t);
  }
  const span = document.createElementNS(SVG, "text");
  span.setAttribute("x", left);
  span.setAttribute("y", h - 2);
  span.textContent = `last ${Math.max(1, Math.round((tMax - tMin) / 60))} min`;
  svg.append(span);
  for (const s of series) {
    let d = "";
    let pen = "M";
    for (const [t, v] of s.points) {
      if (v === null) { pen = "M"; continue; }
      d += `${pen}${x(t).toFixed(1)},${y(v).toFixed(1)} `;
      pen = "L";
    }
    const line = document.createElementNS(SVG, "path");
    line.setAttribute("d", d || "M0,0");
    line.setAttribute("fill", "none");
    line.setAttribute("stroke", s.color);
    line.setAttribute("stroke-width", "2");
    svg.append(line);
    for (const [t, v] of s.points.slice(-1)) {  // the latest point, seen even alone
      if (v === null) continue;
      const dot = document.createElementNS(SVG, "circle");
      dot.setAttribute("cx", x(t).toFixed(1));
      dot.setAttribute("cy", y(v).toFixed(1));
      dot.setAttribute("r", "3");
      dot.setAttribute("fill", s.color);
      svg.append(dot);
    }
  }
  box.replaceChildren(svg);
}

const css = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();

function drawSummary(doc) {
  $("broker").textContent = doc.broker;
  document.title = `skyhop ${doc.broker}`;
  const lat = doc.latency_ms || {};
  const live = doc.nodes.filter((n) => n.state !== "offline").length;
  const pool = doc.pool
    ? ` · pool ${doc.pool.ready} ready + ${doc.pool.starting} starting, target ${doc.pool.target}`
    : "";
  $("summary").textContent =
    `policy ${doc.policy} · ${live}/${doc.nodes.length} nodes live · ${doc.pending} pending · ` +
    `p50 ${ms(lat.p50)} ms · p99 ${ms(lat.p99)} ms` + pool +
    (doc.connected ? "" : " · NOT connected to the MQTT server");
}

function drawModels(doc, tMin, tMax) {
  const cards = doc.models.map((m) => {
    const card = el("article", { class: "card", "data-model": m.model });
    card.append(el("h3", {}, m.model));
    const sla = m.sla ? `SLA ${m.sla.budget_ms} ms, priority ${m.sla.priority}` : "no SLA set";
    card.append(el("div", { class: "sla" }, sla));
    const nums = el("div", { class: "nums" });
    const att = m.last_1m.attainment;
    const cls = att === null ? "" : att >= 0.99 ? "good" : att >= 0.9 ? "meh" : "bad";
    const one = el("span", {}, "SLO 1 min ");
    one.append(el("b", { class: cls }, pct(att)));
    nums.append(one, el("span", {}, `10 min ${pct(m.last_10m.attainment)}`),
      el("span", {}, `${m.last_10m.requests} req: ${m.last_10m.edge} edge, ${m.last_10m.cloud} cloud`));
    card.append(nums);
    card.append(el("div", { class: "chart" }), el("small", {}, "latency p50 (blue) and p99 (red)"));
    return card;
  });
  $("models").replaceChildren(...(cards.length ? cards : [el("p", {}, "no requests yet")]));
  doc.models.forEach((m, i) => {
    const points = (key) => m.series.map((p) => [p.t, p[key]]);
    chart(cards[i].querySelector(".chart"), [
      { color: css("--edge"), points: points("p50_ms") },
      { color: css("--bad"), points: points("p99_ms") },
    ], { yFmt: (v) => ms(v) + " ms", tMin, tMax });
  });
}

function drawPlacements(doc, tMin, tMax) {
  const sum = new Map();
  for (const m of doc.models) {
    for (const p of m.series) {
      const s = sum.get(p.t) || { edge: 0, cloud: 0 };
      s.edge += p.edge;
      s.cloud += p.cloud;
      sum.set(p.t, s);
    }
  }
  const ts = [...sum.keys()].sort((a, b) => a - b);
  chart($("placements"), [
    { color: css("--edge"), points: ts.map((t) => [t, sum.get(t).edge]) },
    { color: css("--cloud"), points: ts.map((t) => [t, sum.get(t).cloud]) },
  ], { tMin, tMax });
}

function drawPool(doc, tMin, tMax) {
  $("pool-figure").hidden = !doc.pool;
  if (!doc.pool) return;
  const h = doc.pool_history;
  chart($("pool"), [
    { color: css("--fg"), points: h.map((p) => [p.t, p.target]) },
    { color: css("--ok"), points: h.map((p) => [p.t, p.ready]) },
    { color: css("--warn"), points: h.map((p) => [p.t, p.starting]) },
  ], { tMin, tMax });
}

function drawFleet(doc) {
  const rows = doc.nodes.map((n) => {
    const tr = el("tr", { "data-node": n.node, "data-state": n.state });
    const service = Object.entries(n.service_ms).map(([m, v]) => `${m} ${ms(v)}`).join(", ");
    const cells = [
      [n.node], [n.role], [n.state, `state ${n.state}`], [n.gpu, "wide"],
      [n.queue, "num"], [n.in_flight, "num"], [pct(n.gpu_util), "num"],
      [memory(n.mem_mb), "wide"], [ms(n.rtt_ms), "num wide"], [service || "–", "wide"],
      [`${n.last_seen_s.toFixed(0)} s ago`, "num"],
    ];
    for (const [text, cls] of cells) tr.append(el("td", cls ? { class: cls } : {}, String(text)));
    return tr;
  });
  $("fleet").tBodies[0].replaceChildren(...rows);
  $("fleet-count").textContent = `${doc.nodes.length} nodes`;
}

function drawErrors(doc) {
  const codes = Object.entries(doc.errors.last_10m);
  $("error-codes").textContent = codes.length ? codes.map(([c, n]) => `${c} ${n}`).join(" · ") : "none";
  const rows = doc.errors.latest.slice(-10).reverse().map((e) => {
    const tr = el("tr");
    tr.append(el("td", {}, new Date(e.t * 1000).toLocaleTimeString()),
      el("td", {}, e.model), el("td", { class: "bad" }, e.code), el("td", {}, e.message));
    return tr;
  });
  $("errors").tBodies[0].replaceChildren(...rows);
}

// The charts span what /status holds (10 min), or less while the broker is young.
function span(doc) {
  const ts = doc.models.flatMap((m) => m.series.map((p) => p.t))
    .concat(doc.pool_history.map((p) => p.t));
  const tMax = doc.time;
  const first = ts.length ? Math.min(...ts) : tMax;
  return [Math.max(tMax - 600, Math.min(first - 5, tMax - 60)), tMax];
}

function draw(doc) {
  const [tMin, tMax] = span(doc);
  drawSummary(doc);
  drawModels(doc, tMin, tMax);
  drawPlacements(doc, tMin, tMax);
  drawPool(doc, tMin, tMax);
  drawFleet(doc);
  drawErrors(doc);
}

async function poll() {
  try {
    const response = await fetch("status", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    draw(await response.json());
    $("link").hidden = true;
  } catch (err) {
    $("link").hidden = false;
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();
