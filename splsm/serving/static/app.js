// The page of `splsm serve`: a client of the server's own OpenAI chat-completions API (stream: true).
// Audio goes out as an input_audio part: a bundled clip or an uploaded wav/mp3/flac/ogg as its own bytes,
// anything else the browser can decode (and the microphone) as 16 kHz mono 16-bit WAV made here.
// Every text from the server is shown with textContent: nothing it sends becomes markup.
"use strict";

const $ = (id) => document.getElementById(id);
const TAKEN = ["wav", "mp3", "flac", "ogg"]; // the formats the server takes as they are
let apiKey = ""; // in this page's memory only
let info = null;
let audio = null; // {blob, format, label}
let recorder = null;

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (apiKey) h["Authorization"] = "Bearer " + apiKey;
  return h;
}

async function errorText(r) {
  try {
    const j = await r.json();
    if (j && j.error && j.error.message) return j.error.message;
  } catch (e) {
    /* not JSON */
  }
  return "HTTP " + r.status;
}

class KeyNeeded extends Error {}

async function get(path) {
  const r = await fetch(path, { headers: headers() });
  if (r.status === 401) {
    $("key-box").hidden = false;
    throw new KeyNeeded(await errorText(r));
  }
  if (!r.ok) throw new Error(await errorText(r));
  return r;
}

function setStatus(state, text) {
  const s = $("status");
  s.dataset.state = state;
  s.textContent = text;
  s.className = state === "error" ? "error" : "dim";
}

// ----- audio -----

function useAudio(blob, format, label) {
  audio = { blob, format, label };
  const p = $("player");
  if (p.src) URL.revokeObjectURL(p.src);
  p.src = URL.createObjectURL(blob);
  p.hidden = false;
  $("audio-line").textContent = label + " (" + format + ", " + Math.round(blob.size / 1024) + " KiB)";
  $("ask-go").disabled = false;
}

function wav16k(buffer) {
  // An AudioBuffer as 16 kHz mono 16-bit PCM WAV: resampled by the browser, channels averaged.
  const rate = 16000;
  const frames = Math.max(1, Math.ceil(buffer.duration * rate));
  const ctx = new OfflineAudioContext(1, frames, rate);
  const src = ctx.createBufferSource();
  src.buffer = buffer;
  src.connect(ctx.destination);
  src.start();
  return ctx.startRendering().then((out) => {
    const x = out.getChannelData(0);
    const data = new DataView(new ArrayBuffer(44 + 2 * x.length));
    const str = (o, s) => { for (let i = 0; i < s.length; i++) data.setUint8(o + i, s.charCodeAt(i)); };
    str(0, "RIFF"); data.setUint32(4, 36 + 2 * x.length, true); str(8, "WAVE");
    str(12, "fmt "); data.setUint32(16, 16, true); data.setUint16(20, 1, true); data.setUint16(22, 1, true);
    data.setUint32(24, rate, true); data.setUint32(28, 2 * rate, true); data.setUint16(32, 2, true);
    data.setUint16(34, 16, true); str(36, "data"); data.setUint32(40, 2 * x.length, true);
    for (let i = 0; i < x.length; i++) {
      const v = Math.max(-1, Math.min(1, x[i]));
      data.setInt16(44 + 2 * i, v < 0 ? v * 0x8000 : v * 0x7fff, true);
    }
    return new Blob([data], { type: "audio/wav" });
  });
}

async function toWav(blob) {
  const ctx = new AudioContext();
  try {
    return await wav16k(await ctx.decodeAudioData(await blob.arrayBuffer()));
  } finally {
    ctx.close();
  }
}

async function pickClip() {
  const id = $("clip").value;
  $("clip-transcript").textContent = "";
  if (!id) return;
  $("file").value = "";
  const clip = info.clips.find((c) => c.id === id);
  try {
    const r = await get("/web/clips/" + encodeURIComponent(id));
    useAudio(await r.blob(), clip.format, clip.label);
    $("clip-transcript").textContent = clip.transcript ? "Transcript: " + clip.transcript : "";
  } catch (e) {
    setStatus("error", "The clip could not be fetched: " + e.message);
  }
}

async function pickFile() {
  const f = $("file").files[0];
  if (!f) return;
  $("clip").value = "";
  $("clip-transcript").textContent = "";
  const ext = (f.name.split(".").pop() || "").toLowerCase();
  if (TAKEN.includes(ext)) {
    useAudio(f, ext, f.name);
    return;
  }
  try {
    useAudio(await toWav(f), "wav", f.name + ", converted to WAV in the browser");
  } catch (e) {
    setStatus("error", "This browser cannot decode " + f.name + ": send wav, mp3, flac or ogg.");
  }
}

async function toggleRecord() {
  const button = $("record");
  if (recorder) {
    recorder.stop();
    return;
  }
  if (!navigator.mediaDevices || !window.MediaRecorder) {
    $("record-note").textContent =
      "The browser allows the microphone only on https or localhost: upload a file instead.";
    return;
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (e) {
    $("record-note").textContent = "No microphone: " + e.message;
    return;
  }
  const chunks = [];
  recorder = new MediaRecorder(stream);
  recorder.ondataavailable = (ev) => { if (ev.data.size) chunks.push(ev.data); };
  recorder.onstop = async () => {
    stream.getTracks().forEach((t) => t.stop());
    recorder = null;
    button.textContent = "● Record";
    $("record-note").textContent = "";
    try {
      const wav = await toWav(new Blob(chunks, { type: chunks.length ? chunks[0].type : "" }));
      $("clip").value = "";
      $("file").value = "";
      $("clip-transcript").textContent = "";
      useAudio(wav, "wav", "Your recording");
    } catch (e) {
      setStatus("error", "The recording could not be decoded: " + e.message);
    }
  };
  recorder.start();
  button.textContent = "■ Stop";
  $("record-note").textContent = "recording (at most " + info.max_audio_s + " s)…";
  setTimeout(() => { if (recorder && recorder.state === "recording") recorder.stop(); }, 1000 * info.max_audio_s);
}

// ----- asking -----

function base64(blob) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(String(r.result).slice(String(r.result).indexOf(",") + 1));
    r.onerror = () => reject(r.error);
    r.readAsDataURL(blob);
  });
}

async function ask() {
  if (!audio) return;
  const out = $("answer");
  out.textContent = "";
  $("ask-go").disabled = true;
  setStatus("waiting", "sending…");
  try {
    const content = [];
    const text = $("instruction").value.trim();
    if (text) content.push({ type: "text", text });
    content.push({ type: "input_audio", input_audio: { data: await base64(audio.blob), format: audio.format } });
    const body = { model: info.model, messages: [{ role: "user", content }], stream: true };
    const n = parseInt($("max-tokens").value, 10);
    if (n > 0) body.max_tokens = n;
    const r = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify(body),
    });
    if (r.status === 401) $("key-box").hidden = false;
    if (!r.ok) throw new Error(await errorText(r));
    setStatus("streaming", "answering…");
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    let finish = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const ev = buf.slice(0, i);
        buf = buf.slice(i + 2);
        if (!ev.startsWith("data: ")) continue;
        const data = ev.slice(6);
        if (data === "[DONE]") continue;
        const obj = JSON.parse(data);
        if (obj.error) throw new Error(obj.error.message);
        const c = obj.choices && obj.choices[0];
        if (c && c.delta && c.delta.content) out.textContent += c.delta.content;
        if (c && c.finish_reason) finish = c.finish_reason;
      }
    }
    setStatus("done", finish === "length" ? "done (max tokens reached)" : "done");
  } catch (e) {
    setStatus("error", e.message);
  } finally {
    $("ask-go").disabled = false;
  }
}

// ----- lineage -----

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function pct(x) {
  return x === null || x === undefined ? "n/a" : (100 * x).toFixed(1) + "%";
}

function section(parent, id, title) {
  const s = el("section");
  s.id = id;
  s.appendChild(el("h3", title));
  parent.appendChild(s);
  return s;
}

function facts(parent, pairs) {
  const dl = el("dl");
  for (const [k, v] of pairs) {
    if (v === undefined) continue;
    dl.appendChild(el("dt", k));
    dl.appendChild(el("dd", v === null ? "—" : typeof v === "object" ? JSON.stringify(v) : v));
  }
  parent.appendChild(dl);
}

function table(parent, header, rows) {
  const t = el("table");
  const tr = el("tr");
  header.forEach((h) => tr.appendChild(el("th", h)));
  t.appendChild(tr);
  for (const r of rows) {
    const row = el("tr");
    r.forEach((c) => row.appendChild(el("td", c)));
    t.appendChild(row);
  }
  parent.appendChild(t);
}

function settings(parent, title, obj) {
  const entries = Object.entries(obj || {});
  if (!entries.length) return;
  const d = el("details");
  d.appendChild(el("summary", title));
  facts(d, entries);
  parent.appendChild(d);
}

function showLineage(c) {
  const body = $("lineage-body");
  body.textContent = "";
  if (c.evaluation) {
    const e = c.evaluation;
    const s = section(body, "lineage-evaluation", "Evaluation of this checkpoint");
    if (e.wer.length) {
      table(s, ["eval set", "system", "utterances", "WER"],
        e.wer.map((w) => [w.eval_set, w.system, w.n_utterances, pct(w.wer)]));
    }
    if (e.anchor_rate.length) {
      table(s, ["eval set", "category", "items", "anchor rate", "anchor rate (own ASR)"],
        e.anchor_rate.map((a) => [a.eval_set, a.category, a.n_items, pct(a.anchor_rate), pct(a.anchor_rate_own)]));
    }
    if (e.qa.length) {
      table(s, ["eval set", "questions", "QA accuracy"],
        e.qa.map((q) => [q.eval_set, q.n_questions, pct(q.accuracy)]));
    }
    facts(s, [["evaluate run", e.run_id], ["finished", e.ended_at]]);
  }
  if (c.training) {
    const t = c.training;
    const s = section(body, "lineage-training", "Training run");
    facts(s, [
      ["run", t.run_id],
      ["finished", t.ended_at],
      ["code", t.git_commit || t.code_version],
      ["host", t.host],
      ["Prefect flow run", t.flow_run_id || undefined],
    ]);
    settings(s, "training settings", t.settings);
  }
  if (c.answers) {
    const a = c.answers;
    const s = section(body, "lineage-answers", "Answers by (the self-powered data)");
    facts(s, [
      ["LLM", a.llm ? a.llm.location : (a.settings && a.settings.served_model) || "—"],
      ["LLM made by", a.llm && a.llm.made_by ? a.llm.made_by.stage + " from " + a.llm.sources.join(", ") : undefined],
      [a.stage + " run", a.run_id],
    ]);
    settings(s, "answer settings", a.settings);
  }
  if (c.corpora && c.corpora.length) {
    const s = section(body, "lineage-corpora", "Corpora");
    table(s, ["corpus", "split", "kind", "location"], c.corpora.map((x) => [x.name, x.split, x.kind, x.location]));
  }
  if (c.models && c.models.length) {
    const s = section(body, "lineage-models", "Started from");
    table(s, ["part", "model", "made by"], c.models.map((m) => [
      m.role, m.location,
      m.made_by ? m.made_by.stage + (m.sources && m.sources.length ? " from " + m.sources.join(", ") : "") : "—",
    ]));
    if (c.examples) facts(s, [["training examples", c.examples.location + " (" + c.examples.rows + " rows)"]]);
  }
  const ck = c.checkpoint || {};
  const s0 = section(body, "lineage-checkpoint", "Checkpoint");
  facts(s0, [
    ["path", ck.path],
    ["prompt layout", ck.recipe ? ck.recipe.prompt_format : undefined],
    ["instruction catalog", ck.recipe ? ck.recipe.catalog : undefined],
    ["lineage store", c.store],
  ]);
  if (c.notes && c.notes.length) {
    const s = section(body, "lineage-notes", "Notes");
    const ul = el("ul");
    c.notes.forEach((n) => ul.appendChild(el("li", n)));
    s.appendChild(ul);
  }
}

// ----- start -----

async function load() {
  try {
    info = await (await get("/web/info")).json();
  } catch (e) {
    if (!(e instanceof KeyNeeded)) $("model-line").textContent = "Error: " + e.message;
    else $("model-line").textContent = apiKey ? "The API key was refused: " + e.message : "Give the API key to start.";
    return;
  }
  $("key-box").hidden = true;
  $("model-line").textContent = "Model " + info.model + ": greedy answers, clips up to " + info.max_audio_s +
    " s, prompts in the " + info.recipe.prompt_format + " layout with the " + info.recipe.catalog + " wordings" +
    (info.recipe_note ? " (" + info.recipe_note + ")" : "") + ".";
  const clipSel = $("clip");
  clipSel.length = 1;
  for (const c of info.clips) {
    const o = el("option", c.label + " — " + c.seconds + " s");
    o.value = c.id;
    clipSel.appendChild(o);
  }
  const taskSel = $("task");
  taskSel.length = 1;
  for (const t of info.tasks) {
    const o = el("option", t.name + ": " + t.instruction);
    o.value = t.name;
    taskSel.appendChild(o);
  }
  if (info.default_instruction) {
    $("instruction").placeholder = "Empty: the recipe's ASR wording, \u201c" + info.default_instruction + "\u201d";
  }
  $("max-tokens").value = info.default_max_tokens;
  $("max-tokens").max = info.max_tokens;
  try {
    showLineage(await (await get("/web/lineage")).json());
  } catch (e) {
    $("lineage-body").textContent = "The lineage could not be read: " + e.message;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("key-go").addEventListener("click", () => { apiKey = $("key").value.trim(); load(); });
  $("key").addEventListener("keydown", (ev) => { if (ev.key === "Enter") $("key-go").click(); });
  $("clip").addEventListener("change", pickClip);
  $("file").addEventListener("change", pickFile);
  $("record").addEventListener("click", toggleRecord);
  $("task").addEventListener("change", () => {
    const t = info && info.tasks.find((x) => x.name === $("task").value);
    if (t) $("instruction").value = t.instruction;
  });
  $("ask-go").addEventListener("click", ask);
  load();
});
