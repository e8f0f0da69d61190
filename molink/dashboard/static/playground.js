// /playground: a chat streaming from this server's /v1/chat/completions.

import { authorizedFetch, el, formatSeconds, readEvents } from "./api.js";
import { renderMarkdown } from "./markdown.js";

const ROUTE_HEADER = "x-molink-route";
const history = [];
let model = null;
let controller = null;

const $ = (id) => document.getElementById(id);

async function loadModel() {
  const response = await authorizedFetch("/v1/models");
  if (!response.ok) return;
  const body = await response.json();
  model = body.data?.[0]?.id ?? null;
  $("model").textContent = model ? `model ${model}` : "";
}

function settings() {
  const temperature = Number($("temperature").value);
  const maxTokens = Number($("max-tokens").value);
  const stop = $("stop").value.split("\n").filter((line) => line.length > 0);
  const body = { temperature, max_tokens: maxTokens, stream: true, stream_options: { include_usage: true } };
  if (stop.length) body.stop = stop;
  if (model) body.model = model;
  return body;
}

function bubble(role, text) {
  const content = el("div", { className: "content" });
  const stats = el("div", { className: "stats" });
  const message = el("article", { className: `message ${role}`, dataset: { role } },
    el("div", { className: "role" }, role), content, stats);
  if (role === "assistant") content.append(renderMarkdown(text)); else content.textContent = text;
  $("messages").append(message);
  return { message, content, stats };
}

function showStats(view, s) {
  const parts = [];
  if (s.tokens !== null) parts.push(`${s.tokens} tokens`);
  if (s.ttft !== null) parts.push(`TTFT ${formatSeconds(s.ttft)}`);
  if (s.rate !== null) parts.push(`${s.rate.toFixed(1)} tokens/s`);
  if (s.route) parts.push(`route ${s.route.split(",").join(" → ")}`);
  if (s.finish) parts.push(`finished: ${s.finish}`);
  view.stats.textContent = parts.join(" · ");
  Object.assign(view.message.dataset, {
    ttft: String(s.ttft ?? ""), rate: String(s.rate ?? ""), route: s.route ?? "", tokens: String(s.tokens ?? ""),
  });
}

// The route that computed the answer's last tokens, once the request finished.
async function servedRoute(id) {
  const response = await authorizedFetch(`/dashboard/api/served/${encodeURIComponent(id)}`);
  if (!response.ok) return null;
  const body = await response.json();
  return body.route.join(",");
}

async function send(text) {
  const system = $("system").value.trim();
  history.push({ role: "user", content: text });
  bubble("user", text);
  const view = bubble("assistant", "");
  view.message.dataset.state = "streaming";
  const messages = system ? [{ role: "system", content: system }, ...history] : [...history];
  controller = new AbortController();
  $("send").disabled = true;
  $("stop-button").disabled = false;
  const started = performance.now();
  let firstAt = null;
  let answer = "";
  let responseId = null;
  const s = { tokens: null, ttft: null, rate: null, route: "", finish: "" };
  try {
    const response = await authorizedFetch("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ ...settings(), messages }), signal: controller.signal,
    });
    s.route = response.headers.get(ROUTE_HEADER) ?? "";
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(body.error?.message ?? `HTTP ${response.status}`);
    }
    await readEvents(response, (_, data) => {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.id) responseId = chunk.id;
      const choice = chunk.choices?.[0];
      if (choice?.delta?.content) {
        if (firstAt === null) { firstAt = performance.now(); s.ttft = (firstAt - started) / 1000; }
        answer += choice.delta.content;
        view.content.replaceChildren(renderMarkdown(answer));
        view.message.dataset.raw = answer;
      }
      if (choice?.finish_reason) s.finish = choice.finish_reason;
      if (chunk.usage) s.tokens = chunk.usage.completion_tokens;
      showStats(view, s);
    });
    const decodeS = (performance.now() - (firstAt ?? started)) / 1000;
    if (s.tokens > 1 && decodeS > 0) s.rate = (s.tokens - 1) / decodeS;
    history.push({ role: "assistant", content: answer });
    // A stream's header names the route at its start; the request may have moved since.
    if (responseId) s.route = (await servedRoute(responseId)) ?? s.route;
  } catch (error) {
    view.message.classList.add("failed");
    s.finish = error.name === "AbortError" ? "stopped" : `error: ${error.message}`;
    if (answer) history.push({ role: "assistant", content: answer });
  } finally {
    view.message.dataset.raw = answer;
    showStats(view, s);
    view.message.dataset.state = "done";
    controller = null;
    $("send").disabled = false;
    $("stop-button").disabled = true;
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("composer").requestSubmit(); }
});
$("stop-button").addEventListener("click", () => controller?.abort());
$("clear").addEventListener("click", () => { history.length = 0; $("messages").replaceChildren(); });

loadModel();
