// The coverage bar: layers 0..L, how many serving nodes hold each, every node's span below
// (overlapping spans, i.e. replicas, stacked in lanes), uncovered spans marked, and each
// link's measured bandwidth and round trip at the boundary it crosses.

import { formatRate, formatSeconds } from "./api.js";

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 1000;
const STRIP = 26;
const LANE = 30;
const AXIS = 20;
const LINK_ROW = 18;

function svg(tag, attrs = {}, text = null) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  if (text !== null) node.textContent = text;
  return node;
}

// Greedy lanes: each span goes to the first lane where it overlaps nothing.
function lanes(nodes) {
  const ends = [];
  const placed = [];
  for (const node of [...nodes].sort((a, b) => a.start - b.start || a.end - b.end)) {
    let lane = ends.findIndex((end) => end <= node.start);
    if (lane < 0) { lane = ends.length; ends.push(0); }
    ends[lane] = node.end;
    placed.push({ node, lane });
  }
  return { placed, count: Math.max(ends.length, 1) };
}

// Where each link's label goes: at the layer boundary it crosses (the last stage's link
// back to the head at the right end); links crossing the same boundary get rows of their own.
function linkLabels(snapshot) {
  const byId = new Map(snapshot.nodes.map((node) => [node.node_id, node]));
  const rowsAt = new Map();
  const labels = [];
  for (const link of snapshot.links) {
    const source = byId.get(link.source);
    const target = byId.get(link.target);
    if (!source || !target) continue;
    const back = target.start < source.end;
    const at = back ? snapshot.num_layers : source.end;
    const row = rowsAt.get(at) ?? 0;
    rowsAt.set(at, row + 1);
    const text = `${back ? "↩ head" : "→"} ${formatRate(link.bandwidth_bytes_per_s)}, RTT ${formatSeconds(link.rtt_s)}`;
    labels.push({ link, at, row, text, back });
  }
  return { labels, rows: Math.max(0, ...rowsAt.values()) };
}

export function renderCoverage(container, snapshot) {
  const L = Math.max(snapshot.num_layers, 1);
  const { placed, count } = lanes(snapshot.nodes);
  const links = linkLabels(snapshot);
  const linksTop = STRIP + AXIS + count * LANE + 4;
  const height = linksTop + links.rows * LINK_ROW + 6;
  const x = (layer) => (layer / L) * WIDTH;
  const root = svg("svg", { viewBox: `0 0 ${WIDTH} ${height}`, role: "img", id: "coverage-svg" });
  root.append(svg("title", {}, `coverage of layers 0 to ${snapshot.num_layers}`));
  snapshot.coverage.forEach((holders, layer) => {
    root.append(svg("rect", {
      x: x(layer), y: 0, width: x(layer + 1) - x(layer) + 0.5, height: STRIP,
      class: holders === 0 ? "layer uncovered" : holders > 1 ? "layer replicated" : "layer covered",
      "data-layer": layer, "data-holders": holders,
    }));
  });
  for (const span of snapshot.missing_spans) {
    const gap = svg("g", { class: "missing-span", "data-start": span.start, "data-end": span.end });
    gap.append(svg("rect", { x: x(span.start), y: 0, width: x(span.end) - x(span.start), height: STRIP }));
    gap.append(svg("text", { x: (x(span.start) + x(span.end)) / 2, y: STRIP - 8, "text-anchor": "middle" },
      `[${span.start}, ${span.end}) uncovered`));
    root.append(gap);
  }
  const step = L <= 16 ? 1 : L <= 40 ? 5 : 10;
  for (let layer = 0; layer <= L; layer += step) {
    root.append(svg("line", { x1: x(layer), x2: x(layer), y1: STRIP, y2: STRIP + 5, class: "tick" }));
    root.append(svg("text", { x: Math.min(Math.max(x(layer), 6), WIDTH - 6), y: STRIP + 16,
      "text-anchor": "middle", class: "tick-label" }, String(layer)));
  }
  for (const { node, lane } of placed) {
    const y = STRIP + AXIS + lane * LANE;
    const group = svg("g", { class: `span health-${node.health}`, "data-node-id": node.node_id,
      "data-start": node.start, "data-end": node.end, "data-health": node.health });
    group.append(svg("title", {}, `${node.node_id}: layers [${node.start}, ${node.end}), ${node.health}`));
    group.append(svg("rect", { x: x(node.start) + 1, y, width: Math.max(x(node.end) - x(node.start) - 2, 2),
      height: LANE - 6, rx: 4 }));
    group.append(svg("text", { x: (x(node.start) + x(node.end)) / 2, y: y + LANE / 2 + 1,
      "text-anchor": "middle" }, `${node.node_id} [${node.start}, ${node.end})`));
    root.append(group);
  }
  for (const { link, at, row, text, back } of links.labels) {
    const anchor = back || at >= L ? "end" : at <= 0 ? "start" : "middle";
    root.append(svg("text", { x: x(at), y: linksTop + (row + 1) * LINK_ROW - 5, "text-anchor": anchor,
      class: "link-label", "data-source": link.source, "data-target": link.target }, text));
  }
  container.replaceChildren(root);
  const covered = snapshot.coverage.filter((holders) => holders > 0).length;
  container.dataset.covered = String(covered);
  container.dataset.layers = String(snapshot.num_layers);
}
