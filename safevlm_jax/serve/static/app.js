// SafeVLM web demo: pick an image (or a sample), ask, read the verdict and the streamed answer,
// ask follow-up questions about the same image.
// Talks to the same OpenAI-style API as any client (POST /v1/chat/completions, stream: true):
// each question sends the whole conversation as messages (the optional system prompt, then
// the earlier questions and this column's answers, the image in the first question); with
// "compare" on, the same conversation also runs with safety: false, side by side.
"use strict";

const $ = (id) => document.getElementById(id);
let server = null;      // GET /health: model name, auth, taxonomy
let imageUrl = null;    // the chosen image as a data: URL
let busy = false;       // a question is being answered
let turns = [];         // answered questions: {question, answers: {"col-on": text, "col-off": text}}

function updateButtons() {
  $("ask").disabled = !server || !imageUrl || busy;
  $("ask").title = imageUrl ? "" : "choose an image first";
  $("new-chat").disabled = busy || turns.length === 0;
  $("compare").disabled = !server || !server.safety_off_allowed || busy || turns.length > 0;
}

async function init() {
  try {
    const r = await fetch("/health");
    server = await r.json();
    $("model").textContent = `model: ${server.model}` + (server.slots ? ` · ${server.slots} slots` : "");
    $("key-row").hidden = !server.auth;
    setStatus("choose an image, or one of the samples, to ask about it");
  } catch (e) {
    $("model").textContent = `server unreachable: ${e}`;
  }
  updateButtons();
  loadSamples();
}

async function loadSamples() {
  const samples = await (await fetch("/examples.json")).json();
  for (const sample of samples) {
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.name = sample.name;
    button.title = `sample: ${sample.name}`;
    const img = document.createElement("img");
    img.src = sample.url; img.alt = sample.name;
    button.append(img);
    button.addEventListener("click", async () => {
      const blob = await (await fetch(sample.url)).blob();
      chooseFile(new File([blob], `${sample.name}.png`, { type: blob.type || "image/png" }), button);
    });
    $("samples").append(button);
  }
}

function chooseFile(file, sampleButton = null) {
  if (!file || busy) return;
  if (!file.type.startsWith("image/")) { setStatus(`not an image: ${file.name}`); return; }
  const reader = new FileReader();
  reader.onload = () => {
    imageUrl = reader.result;
    $("preview").src = imageUrl;
    $("preview").hidden = false;
    $("drop-hint").hidden = true;
    document.querySelectorAll("#samples button").forEach((b) => b.classList.toggle("chosen", b === sampleButton));
    setStatus(`${file.name} (${Math.round(file.size / 1024)} KiB)`);
    newConversation();
  };
  reader.readAsDataURL(file);
}

// A new image or "New conversation": the earlier questions and answers are dropped.
function newConversation() {
  turns = [];
  for (const col of [$("col-on"), $("col-off")]) {
    col.querySelector(".history").replaceChildren();
    col.querySelector(".question").hidden = true;
    col.querySelector(".text").textContent = "";
    col.querySelector(".finish").textContent = "";
    col.dataset.state = "idle";
  }
  updateButtons();
}

// The messages of one column: system prompt, earlier turns with this column's answers, the question.
function messages(colId, question) {
  const out = [];
  const system = $("system").value.trim();
  if (system) out.push({ role: "system", content: system });
  const user = (text, first) => first
    ? { role: "user", content: [{ type: "image_url", image_url: { url: imageUrl } }, { type: "text", text }] }
    : { role: "user", content: text };
  turns.forEach((t, i) => { out.push(user(t.question, i === 0), { role: "assistant", content: t.answers[colId] }); });
  out.push(user(question, turns.length === 0));
  return out;
}

// Every answered question above the one being asked, with this column's answers.
function showHistory(col) {
  const history = col.querySelector(".history");
  history.replaceChildren();
  for (const turn of turns) {
    for (const [cls, text] of [["user", turn.question], ["assistant", turn.answers[col.id]]]) {
      const d = document.createElement("div");
      d.className = `turn ${cls}`; d.textContent = text;
      history.append(d);
    }
  }
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
  if (!safety) { line.textContent = "not checked: the safety head gave no verdict for this request"; return; }
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

// One streamed chat completion into one column; its answer, or null on an error.
async function ask(col, textEl, safety, question) {
  col.dataset.state = "streaming";
  textEl.textContent = "";
  col.querySelector(".finish").textContent = "";
  col.querySelector(".question").textContent = question;
  col.querySelector(".question").hidden = false;
  const line = col.querySelector(".verdict-line");
  if (line) { line.textContent = "checking…"; line.classList.add("muted"); col.querySelectorAll(".bars").forEach((b) => b.replaceChildren()); }
  const body = {
    model: server.model, messages: messages(col.id, question), stream: true, safety,
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
    return textEl.textContent;
  } catch (e) {
    textEl.textContent = `error ${e.message}`;
    if (line) line.textContent = "no verdict";
    col.dataset.state = "error";
    return null;
  }
}

async function askAll() {
  const question = $("question").value.trim();
  if ($("ask").disabled || !question) return;
  busy = true;
  updateButtons();
  const cols = [$("col-on")];
  $("col-off").hidden = !$("compare").checked;
  if ($("compare").checked) cols.push($("col-off"));
  cols.forEach(showHistory);
  const answers = await Promise.all(cols.map((col) => ask(col, col.querySelector(".text"), col.id === "col-on", question)));
  if (answers.every((a) => a !== null)) {
    turns.push({ question, answers: Object.fromEntries(cols.map((col, i) => [col.id, answers[i]])) });
    $("question").value = "";
    $("question").placeholder = "Ask a follow-up question about the same image";
  }
  busy = false;
  updateButtons();
}

$("image").addEventListener("change", (e) => chooseFile(e.target.files[0]));
const drop = $("drop");
["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); }));
["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.remove("over"); }));
drop.addEventListener("drop", (e) => chooseFile(e.dataTransfer.files[0]));
$("ask").addEventListener("click", askAll);
$("new-chat").addEventListener("click", newConversation);
$("question").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) askAll(); });
init();
