// SafeVLM web demo: pick an image, ask, read the verdict and the streamed answer.
// Talks to the same OpenAI-style API as any client (POST /v1/chat/completions, stream: true);
// with "compare" on, the same question also runs with safety: false, side by side.
"use strict";

const $ = (id) => document.getElementById(id);
let server = null;      // GET /health: model name, auth, taxonomy
let imageUrl = null;    // the chosen image as a data: URL

async function init() {
  try {
    const r = await fetch("/health");
    server = await r.json();
    $("model").textContent = `model: ${server.model}` + (server.slots ? ` · ${server.slots} slots` : "");
    $("key-row").hidden = !server.auth;
    $("compare").disabled = !server.safety_off_allowed;
    $("ask").disabled = false;
  } catch (e) {
    $("model").textContent = `server unreachable: ${e}`;
  }
}

function chooseFile(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) { setStatus(`not an image: ${file.name}`); return; }
  const reader = new FileReader();
  reader.onload = () => {
    imageUrl = reader.result;
    $("preview").src = imageUrl;
    $("preview").hidden = false;
    $("drop-hint").hidden = true;
    setStatus(`${file.name} (${Math.round(file.size / 1024)} KiB)`);
  };
  reader.readAsDataURL(file);
}

function setStatus(text) { $("status").textContent = text; }

function bars(el, names, probs) {
  el.replaceChildren();
  if (!probs) return;
  const top = probs.indexOf(Math.max(...probs.map((p) => p ?? -1)));
  names.forEach((name, i) => {
    const p = probs[i];
    const row = (cls, child) => { const d = document.createElement("div"); d.className = cls; if (child) d.append(child); return d; };
    const label = row(i === top ? "top" : "", document.createTextNode(name));
    const fill = row("fill"); fill.style.width = `${p == null ? 0 : (100 * p).toFixed(1)}%`;
    const track = row(i === top ? "top" : ""); const inner = row("track", fill); track.append(inner);
    const value = row(i === top ? "top" : "", document.createTextNode(p == null ? "n/a" : `${(100 * p).toFixed(1)}%`));
    el.append(label, track, value);
  });
}

function showVerdict(col, safety) {
  const line = col.querySelector(".verdict-line");
  if (!safety) { line.textContent = "not checked (safety off)"; return; }
  const badge = document.createElement("span");
  badge.className = `badge level-${safety.risk_level}`;
  badge.textContent = `level ${safety.risk_level} (${safety.risk_level_name})`;
  const rest = ` type: ${safety.risk_type_name} · action: ${safety.action}` +
    (safety.hint_applied ? " · hint applied" : "") + (safety.fail_closed ? " · fail-closed" : "");
  line.replaceChildren(badge, document.createTextNode(rest));
  line.classList.remove("muted");
  bars(col.querySelector('.bars[data-kind="level"]'), server.risk_levels, safety.risk_level_probs);
  bars(col.querySelector('.bars[data-kind="type"]'), server.risk_types, safety.risk_type_probs);
}

// One streamed chat completion into one column.
async function ask(col, textEl, safety) {
  col.dataset.state = "streaming";
  textEl.textContent = "";
  col.querySelector(".finish").textContent = "";
  const line = col.querySelector(".verdict-line");
  if (line) { line.textContent = "checking…"; line.classList.add("muted"); col.querySelectorAll(".bars").forEach((b) => b.replaceChildren()); }
  const content = [{ type: "text", text: $("question").value }];
  if (imageUrl) content.unshift({ type: "image_url", image_url: { url: imageUrl } });
  const body = {
    model: server.model, messages: [{ role: "user", content }], stream: true, safety,
    max_tokens: Number($("max-tokens").value) || 128, temperature: Number($("temperature").value) || 0,
  };
  const headers = { "Content-Type": "application/json" };
  if ($("api-key").value) headers.Authorization = `Bearer ${$("api-key").value}`;
  const started = performance.now();
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers, body: JSON.stringify(body) });
    if (!r.ok) {
      const err = await r.json().catch(() => ({ error: { message: r.statusText } }));
      throw new Error(`${r.status}: ${err.error.message}`);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", finish = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const choice = chunk.choices[0];
        if (!choice) continue;
        if ("safety" in choice && line) showVerdict(col, choice.safety);
        if (choice.delta.content) textEl.textContent += choice.delta.content;
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
    col.querySelector(".finish").textContent =
      `finish: ${finish} · ${((performance.now() - started) / 1000).toFixed(2)} s`;
    col.dataset.state = "done";
  } catch (e) {
    textEl.textContent = `error ${e.message}`;
    if (line) line.textContent = "no verdict";
    col.dataset.state = "error";
  }
}

async function askAll() {
  $("ask").disabled = true;
  const compare = $("compare").checked;
  $("col-off").hidden = !compare;
  const runs = [ask($("col-on"), $("answer-on"), true)];
  if (compare) runs.push(ask($("col-off"), $("answer-off"), false));
  await Promise.all(runs);
  $("ask").disabled = false;
}

$("image").addEventListener("change", (e) => chooseFile(e.target.files[0]));
const drop = $("drop");
["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); }));
["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.remove("over"); }));
drop.addEventListener("drop", (e) => chooseFile(e.dataTransfer.files[0]));
$("ask").addEventListener("click", askAll);
$("question").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) askAll(); });
init();
