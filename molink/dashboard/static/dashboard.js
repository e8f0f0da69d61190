// /dashboard: the swarm as a picture, updated by server-sent events about once a second.

import { authorizedFetch, el, formatRate, formatSeconds, readEvents } from "./api.js";
import { LineChart } from "./charts.js";
import { renderCoverage } from "./coverage.js";

const RETRY_MS = 2000;
const ms = (v) => formatSeconds(v);
const count = (v) => (Number.isInteger(v) ? String(v) : v.toFixed(1));
// Whole percents from 10% up (toPrecision would write 100% as "1.0e+2%"), two digits below.
const percent = (v) => (v === 0 ? "0%" : `${v >= 0.1 ? (v * 100).toFixed(0) : (v * 100).toPrecision(2)}%`);

const charts = {
  tokens: new LineChart(document.getElementById("chart-tokens"),
    [{ key: "tokens_per_s", label: "tokens/s", color: "#2563eb" }]),
  requests: new LineChart(document.getElementById("chart-requests"), [
    { key: "running", label: "running", color: "#16a34a" },
    { key: "waiting", label: "waiting", color: "#d97706" },
  ], count),
  ttft: new LineChart(document.getElementById("chart-ttft"), [
    { key: "ttft_p50", label: "p50", color: "#2563eb" },
    { key: "ttft_p90", label: "p90", color: "#d97706" },
    { key: "ttft_p99", label: "p99", color: "#dc2626" },
  ], ms),
  itl: new LineChart(document.getElementById("chart-itl"), [
    { key: "itl_p50", label: "p50", color: "#2563eb" },
    { key: "itl_p90", label: "p90", color: "#d97706" },
    { key: "itl_p99", label: "p99", color: "#dc2626" },
  ], ms),
  kv: new LineChart(document.getElementById("chart-kv"),
    [{ key: "kv_usage", label: "KV usage", color: "#7c3aed" }], percent),
  recovery: new LineChart(document.getElementById("chart-recovery"), [
    { key: "failovers_total", label: "failovers", color: "#dc2626" },
    { key: "replays_total", label: "replays", color: "#0891b2" },
  ], count),
};

for (const chart of Object.values(charts)) {
  const legend = chart.canvas.parentElement.querySelector(".legend");
  for (const s of chart.series) {
    const swatch = el("span", { className: "swatch" });
    swatch.style.background = s.color;
    legend.append(el("span", { className: "legend-item" }, swatch, s.label));
  }
}

function kv(node) {
  if (node.kv_total_tokens === null) return "–";
  const free = node.kv_free_tokens === null ? "?" : node.kv_free_tokens;
  return `${free} / ${node.kv_total_tokens} tokens free`;
}

function gib(bytes) {
  return (bytes / 2 ** 30).toFixed(1);
}

function device(node) {
  if (!node.device || node.memory_total_bytes === null) return node.device;
  return `${node.device} (${gib(node.memory_free_bytes)} of ${gib(node.memory_total_bytes)} GiB free)`;
}

function recordAge(node) {
  if (node.record_age_s === null) return "–";
  const age = `${node.record_age_s.toFixed(1)} s`;
  return node.record_expires_s === null ? age : `${age} (expires in ${node.record_expires_s.toFixed(0)} s)`;
}

function renderNodes(snapshot) {
  const rows = snapshot.nodes.map((node) => el("tr", { dataset: { nodeId: node.node_id, health: node.health } },
    el("td", {}, node.node_id + (node.is_head ? " (head)" : "")),
    el("td", {}, node.address || "–"),
    el("td", { className: "layers" }, `[${node.start}, ${node.end})`),
    el("td", {}, el("span", { className: `badge health-${node.health}` }, node.health)),
    el("td", { className: "device" }, [device(node), node.dtype].filter(Boolean).join(" / ") || "–"),
    el("td", {}, ms(node.step_time_s)),
    el("td", {}, node.queued_steps === null ? "–" : String(node.queued_steps)),
    el("td", {}, node.active_sequences === null ? "–" : String(node.active_sequences)),
    el("td", {}, kv(node)),
    el("td", { className: "record" }, recordAge(node)),
    el("td", { className: "detail" }, node.detail),
  ));
  document.getElementById("nodes-body").replaceChildren(...rows);
}

function renderLinks(snapshot) {
  const items = snapshot.links.map((link) => el("li", { dataset: { source: link.source, target: link.target } },
    el("span", { className: "hop" }, `${link.source} → ${link.target}`),
    ` ${formatRate(link.bandwidth_bytes_per_s)}, RTT ${ms(link.rtt_s)} (${link.samples} messages)`));
  const list = document.getElementById("links");
  list.replaceChildren(...(items.length ? items : [el("li", {}, "no links: a single node")]));
}

function renderSummary(snapshot) {
  const missing = snapshot.missing_spans.map((s) => `[${s.start}, ${s.end})`);
  const summary = document.getElementById("summary");
  summary.dataset.missing = missing.join(" ");
  summary.className = missing.length ? "summary bad" : "summary good";
  const routes = snapshot.routes.map((r) => r.join(" → ")).join("; ");
  let state = `every layer is served${routes ? `; route ${routes}` : ""}`;
  if (!snapshot.num_layers) state = "this node knows of no layers yet";
  else if (missing.length) state = `layers ${missing.join(", ")} are not served by any node`;
  summary.textContent = `${snapshot.model} · ${snapshot.num_layers} layers · ${state}`;
}

function render(event) {
  const snapshot = event.snapshot;
  renderSummary(snapshot);
  renderCoverage(document.getElementById("coverage"), snapshot);
  renderNodes(snapshot);
  renderLinks(snapshot);
  for (const chart of Object.values(charts)) chart.add(event.history);
  const status = document.getElementById("status");
  status.textContent = `live · updated ${new Date(snapshot.taken_at * 1000).toLocaleTimeString()}`;
  status.dataset.updatedAt = String(snapshot.taken_at);
}

async function follow() {
  const status = document.getElementById("status");
  for (;;) {
    try {
      const response = await authorizedFetch("/dashboard/api/events");
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      await readEvents(response, (name, data) => { if (name === "swarm") render(JSON.parse(data)); });
      status.textContent = "the server ended the stream; reconnecting";
    } catch (error) {
      status.textContent = `disconnected (${error.message}); reconnecting`;
    }
    await new Promise((resolve) => setTimeout(resolve, RETRY_MS));
  }
}

follow();
