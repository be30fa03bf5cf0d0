// A checkpointed conversation, read-only: the only page that shows conversation content.
// Everything is put in the page as text (textContent), never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  for (const child of children) if (child != null) node.append(child);
  return node;
}
const pretty = (v) => (typeof v === "string" ? v : JSON.stringify(v, null, 2));

function blocks(content) {
  if (content == null) return [];
  if (typeof content === "string") return [el("div", { class: "block", text: content })];
  if (!Array.isArray(content)) return [el("div", { class: "block json", text: pretty(content) })];
  return content.flatMap((b) => {
    switch (b && b.type) {
      case "text": return [el("div", { class: "block", text: b.text })];
      case "thinking": return [el("div", { class: "block-title", text: "thinking" }), el("div", { class: "block", text: b.thinking })];
      case "tool_use": return [el("div", { class: "block-title", text: `tool call: ${b.name} (${b.id})` }),
                               el("div", { class: "block json", text: pretty(b.input) })];
      case "tool_result": return [el("div", { class: "block-title", text: `tool result (${b.tool_use_id})${b.is_error ? ": error" : ""}` }),
                                  ...blocks(b.content)];
      case "image": case "image_url": return [el("div", { class: "block-title", text: "[image]" })];
      default: return [el("div", { class: "block json", text: pretty(b) })];
    }
  });
}

function message(m) {
  const parts = blocks(m.content);
  for (const call of m.tool_calls || []) {
    const fn = call.function || {};
    parts.push(el("div", { class: "block-title", text: `tool call: ${fn.name} (${call.id})` }),
      el("div", { class: "block json", text: pretty(fn.arguments) }));
  }
  const role = m.role || "?";
  return el("div", { class: "message " + role }, el("div", { class: "role", text: role + (m.tool_call_id ? ` (${m.tool_call_id})` : "") }), ...parts);
}

async function load() {
  const sid = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop());
  const response = await fetch(`/_sidecar/sessions/${encodeURIComponent(sid)}/messages`);
  if (!response.ok) { $("title").textContent = (await response.text()).trim(); return; }
  const { session: s, messages } = await response.json();
  document.title = `sidecar session ${s.id}`;
  $("title").textContent = `Session ${s.id}`;
  $("meta").textContent = `agent ${s.agent || "-"} \u00b7 ${s.api || ""} \u00b7 ${s.model || "-"}`;
  const when = (ts) => (ts ? new Date(ts * 1000).toLocaleString() : "-");
  $("info").textContent = `${s.turns || 0} turn${s.turns === 1 ? "" : "s"}, ${messages.length} messages \u00b7 started ${when(s.created)} \u00b7 updated ${when(s.updated)}`;
  const items = messages.map(message);
  if (s.system) items.unshift(message({ role: "system", content: s.system }));
  $("conversation").replaceChildren(...items);
}

load();
