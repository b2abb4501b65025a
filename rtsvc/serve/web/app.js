// rtsvc page: microphone -> ws /v1/stream (f32le at the AudioContext rate) -> speakers.
// A control panel: device pickers, speaker, the knobs the server lists in GET /v1/info (built from
// rtsvc.settings.KNOB_TABLE: basic ones in view, the rest folded under Advanced; a new knob needs no
// change here), level meters, settings kept in
// localStorage between visits, named presets.
// URL options: ?token=T (servers started with --token), ?autostart=1 (OBS), ?speaker=S,
// ?pitch=N (semitones), ?obs=1 (transparent background), ?chunk_ms=20.
"use strict";

const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);
const SETTINGS_KEY = "rtsvc.settings";  // last used knobs, speaker and devices
const PRESETS_KEY = "rtsvc.presets";    // {name: settings}
const WARNING_SHOWN_MS = 5000;  // how long a server `warning` stays in the status line

// read by tests (headless Chromium) and handy in the devtools console
const rtsvc = window.rtsvc = {
  state: "stopped", error: null, ready: null, settings: null, stats: null, info: null,
  warning: null, warnings: 0, warningAt: 0,
  samplesSent: 0, samplesReceived: 0, framesSent: 0, framesReceived: 0, peakReceived: 0,
  underruns: 0, dropped: 0, queuedMs: 0, backlogSkipped: 0, devices: {inputs: 0, outputs: 0},
};

let ctx = null, ws = null, node = null, mic = null, statsTimer = null;
let controls = [];  // the /v1/info control descriptions

function token() { return params.get("token"); }
function withToken(path) { return token() ? `${path}?token=${encodeURIComponent(token())}` : path; }

const STATE_LABELS = {stopped: "stopped", starting: "connecting…", streaming: "live", closed: "disconnected",
                      failed: "failed"};

function setState(state) {  // the connection state, shown in the header's badge
  rtsvc.state = state;
  $("conn").textContent = STATE_LABELS[state] || state;
  $("conn").className = `badge ${state}`;
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").classList.toggle("error", !!isError);
}

function loadJson(key, fallback) {
  try { return JSON.parse(localStorage.getItem(key)) || fallback; } catch (e) { return fallback; }
}

// --- settings: the controls' values, kept between visits -------------------------------------

// A blend (rtsvc.voices.blend): "alice:0.70,bob:0.30" from the speaker, a second one and its weight.
function speakerValue() {
  const first = $("speaker").value || null, second = $("blend-with").value, weight = Number($("blend").value);
  if (!first || !second || second === first || !(weight > 0)) return first;
  if (weight >= 1) return second;
  return `${first}:${(1 - weight).toFixed(2)},${second}:${weight.toFixed(2)}`;
}

function knownSpeaker(value) {  // a speaker of this voice, or a blend of two of them
  if (!value || !rtsvc.info) return false;
  const names = value.split(",").map((part) => part.replace(/:[^:]*$/, "").trim());
  return names.every((name) => rtsvc.info.speakers.includes(name)) && (names.length === 1 || blendable());
}

function blendable() {
  return rtsvc.info && rtsvc.info.voice !== "dsp" && rtsvc.info.speakers.length > 1;
}

function showSpeaker(value) {
  const parts = value.split(",").map((part) => part.split(":"));
  $("speaker").value = parts[0][0].trim();
  $("blend-with").value = parts.length > 1 ? parts[1][0].trim() : "";
  const weight = parts.length > 1 ? Number(parts[1][1]) / (Number(parts[0][1]) + Number(parts[1][1])) : 0;
  $("blend").value = Number.isFinite(weight) ? weight : 0;
  document.querySelector("output[for=blend]").value = $("blend").value;
}

function currentSettings() {
  const settings = {speaker: speakerValue(), mic: $("mic").value, output: $("output").value};
  for (const c of controls) {
    settings[c.name] = c.choices.length ? $(c.name).value : Number($(c.name).value);
  }
  return settings;
}

function knobValues(settings) {
  const knobs = {};
  for (const c of controls) if (settings[c.name] !== undefined) knobs[c.name] = settings[c.name];
  if (knownSpeaker(settings.speaker)) knobs.speaker = settings.speaker;
  return knobs;
}

function showValue(name, value) {
  const input = $(name);
  if (!input) return;
  if (input.tagName === "SELECT" && ![...input.options].some((o) => o.value === String(value))) return;  // not offered here
  input.value = value;
  const label = document.querySelector(`output[for=${name}]`);
  if (label) label.value = value;
}

function applySettings(settings) {
  for (const c of controls) if (settings[c.name] !== undefined && settings[c.name] !== null) showValue(c.name, settings[c.name]);
  if (knownSpeaker(settings.speaker)) showSpeaker(settings.speaker);
  for (const id of ["mic", "output"]) {
    if (settings[id] !== undefined && [...$(id).options].some((o) => o.value === settings[id])) $(id).value = settings[id];
  }
  showLatency();
}

function saveSettings() {
  localStorage.setItem(SETTINGS_KEY, JSON.stringify(currentSettings()));
}

function send(message) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(message));
}

function onControlChange(name) {
  saveSettings();
  showLatency();
  const value = currentSettings()[name];
  send({type: "set", [name]: value});
}

// --- building the panel from /v1/info -----------------------------------------------------------

// Only the controls this voice can honour, and only the denoisers this server has (`supports`:
// docs/protocol.md section 3): a slider the voice cannot follow would end the stream with an error.
function honoured(info) {
  const supports = info.supports;
  if (!supports) return info.controls;
  return info.controls.filter((c) => supports.knobs.includes(c.name)).map((c) =>
    c.name === "denoise" ? {...c, choices: c.choices.filter((x) => supports.denoise.includes(x))} : c);
}

function buildControls(list) {
  controls = list.filter((c) => c.control === "slider" || c.control === "select");  // speaker: its own picker
  $("controls").textContent = "";
  $("advanced-controls").textContent = "";
  $("advanced").hidden = !controls.some((c) => !c.basic);
  for (const c of controls) {
    const box = c.basic ? $("controls") : $("advanced-controls");
    const row = document.createElement("div");
    row.className = "row";
    row.title = c.help;
    const label = document.createElement("label");
    label.htmlFor = c.name;
    label.textContent = c.unit ? `${c.label} (${c.unit})` : c.label;
    row.appendChild(label);
    let input;
    if (c.choices.length) {
      input = document.createElement("select");
      for (const choice of c.choices) {
        const option = document.createElement("option");
        option.value = option.textContent = choice;
        input.appendChild(option);
      }
      row.appendChild(input);
      row.appendChild(document.createElement("span"));
    } else {
      input = document.createElement("input");
      Object.assign(input, {type: "range", min: c.minimum, max: c.maximum, step: c.step});
      const shown = document.createElement("output");
      shown.htmlFor = c.name;
      row.appendChild(input);
      row.appendChild(shown);
      input.addEventListener("input", () => { shown.value = input.value; });
    }
    input.id = c.name;
    input.addEventListener("change", () => onControlChange(c.name));
    box.appendChild(row);
    if (!c.basic) {  // Advanced explains each knob in one line
      const help = document.createElement("div");
      help.className = "help";
      const line = c.help.replace(/^V[0-9]+ models: /, "");  // only this voice's knobs are shown
      help.textContent = line.charAt(0).toUpperCase() + line.slice(1);
      box.appendChild(help);
    }
  }
}

function fillSpeakers(speakers, current) {
  const select = $("speaker");
  select.textContent = "";
  for (const name of speakers) {
    const option = document.createElement("option");
    option.value = option.textContent = name;
    select.appendChild(option);
  }
  const other = $("blend-with");
  other.textContent = "";
  for (const name of ["", ...speakers]) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = name || "none";
    other.appendChild(option);
  }
  for (const row of document.querySelectorAll(".row.blend")) row.hidden = !blendable();
  if (current && knownSpeaker(current)) showSpeaker(current);
}

async function loadInfo() {
  const response = await fetch(withToken("/v1/info"));
  if (!response.ok) throw new Error(`GET /v1/info: ${response.status} ${await response.text()}`);
  const info = rtsvc.info = await response.json();
  $("voice").textContent = info.voice === "dsp" ? "voice: built-in DSP voice" :
    `voice: ${info.voice} (${info.speakers.length} speaker${info.speakers.length === 1 ? "" : "s"})`;
  buildControls(honoured(info));
  fillSpeakers(info.speakers, info.settings.speaker || info.speakers[0]);
  const saved = loadJson(SETTINGS_KEY, {});
  const fromUrl = {};
  if (params.get("speaker")) fromUrl.speaker = params.get("speaker");
  if (params.get("pitch")) fromUrl.pitch_shift = Number(params.get("pitch"));
  applySettings({...info.settings, ...saved, ...fromUrl});
}

// --- devices ------------------------------------------------------------------------------------

async function listDevices() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.enumerateDevices) return;
  const devices = await navigator.mediaDevices.enumerateDevices();
  const saved = currentSettings();
  for (const [id, kind, noun] of [["mic", "audioinput", "microphone"], ["output", "audiooutput", "output"]]) {
    const select = $(id);
    select.textContent = "";
    const fallback = document.createElement("option");
    fallback.value = "";
    fallback.textContent = "system default";
    select.appendChild(fallback);
    let n = 0;
    for (const d of devices.filter((x) => x.kind === kind && x.deviceId && x.deviceId !== "default")) {
      const option = document.createElement("option");
      option.value = d.deviceId;
      option.textContent = d.label || `${noun} ${++n}`;
      select.appendChild(option);
    }
    if ([...select.options].some((o) => o.value === saved[id])) select.value = saved[id];
    rtsvc.devices[id === "mic" ? "inputs" : "outputs"] = select.options.length - 1;
  }
  const canPick = typeof AudioContext !== "undefined" && "setSinkId" in AudioContext.prototype;
  $("output").disabled = !canPick;
  $("output-note").textContent = canPick ? "" : "browser default";
}

// --- latency and status -------------------------------------------------------------------------

function denoiseMs() {
  const choice = $("denoise") ? $("denoise").value : "off";
  return rtsvc.info && choice !== "off" ? rtsvc.info.denoise_latency_ms[choice] || 0 : 0;
}

function showLatency() {
  if (!rtsvc.info) return;
  if (!rtsvc.ready || !ctx) {
    if (rtsvc.state === "stopped" || rtsvc.state === "closed") {
      const engine = rtsvc.info.latency_ms + denoiseMs();
      $("latency").textContent = `≈ ${engine.toFixed(0)} ms`;
      $("latency-note").textContent = "in the engine, + browser buffers once started";
      setStatus(`stopped; latency ≈ ${engine.toFixed(0)} ms in the engine` +
        (denoiseMs() ? ` (${denoiseMs().toFixed(0)} of it noise suppression)` : "") +
        " + browser buffers once started");
    }
    return;
  }
  const engine = (rtsvc.stats && rtsvc.stats.latency_ms !== undefined) ? Number(rtsvc.stats.latency_ms) : rtsvc.ready.latency_ms;
  const device = 1000 * ((ctx.baseLatency || 0) + (ctx.outputLatency || 0));
  const chunk = 1000 * chunkFrames() / ctx.sampleRate;
  const total = engine + rtsvc.queuedMs + device + chunk;
  $("latency").textContent = `${total.toFixed(0)} ms`;
  $("latency-note").textContent = "end-to-end latency";
  let text = `streaming at ${ctx.sampleRate} Hz\n` +
    `latency ≈ ${total.toFixed(0)} ms (engine ${engine.toFixed(0)} + chunk ${chunk.toFixed(0)} + ` +
    `buffer ${rtsvc.queuedMs.toFixed(0)} + device ${device.toFixed(0)})\n` +
    `underruns ${rtsvc.underruns}, dropped ${rtsvc.dropped} samples`;
  if (rtsvc.stats && rtsvc.stats.compute_ms_mean !== undefined) {
    text += `, compute ${Number(rtsvc.stats.compute_ms_mean).toFixed(1)} ms/block`;
  }
  if (rtsvc.stats && rtsvc.stats.auto_pitch !== undefined && rtsvc.stats.auto_pitch !== null) {
    const shift = Number(rtsvc.stats.auto_pitch);  // --pitch auto: the shift the server chose
    text += `\nauto pitch ${shift >= 0 ? "+" : ""}${shift.toFixed(1)} semitones`;
  }
  const behind = rtsvc.warning && performance.now() - rtsvc.warningAt < WARNING_SHOWN_MS;
  setStatus(text, false);
  $("warning").hidden = !behind;  // the banner shows the last warning for a while
}

function showLevel(id, peak) {  // green, amber when loud, red near clipping
  $(id).style.width = `${Math.min(100, 100 * peak)}%`;
  $(id).style.background = peak > 0.95 ? "#e05040" : peak > 0.7 ? "#e0c040" : "#4caf50";
}

function chunkFrames() {
  const ms = Number(params.get("chunk_ms") || 20);
  return Math.max(128, Math.round(ctx.sampleRate * ms / 1000));
}

// --- presets ------------------------------------------------------------------------------------

function listPresets(selected) {
  const presets = loadJson(PRESETS_KEY, {});
  const select = $("preset-list");
  select.textContent = "";
  for (const name of Object.keys(presets).sort()) {
    const option = document.createElement("option");
    option.value = option.textContent = name;
    select.appendChild(option);
  }
  if (!select.options.length) {  // say why Load has nothing to load
    select.appendChild(new Option("no presets yet", ""));
  }
  if (selected) select.value = selected;
}

function savePreset() {
  const name = $("preset-name").value.trim() || $("preset-list").value;
  if (!name) return;
  const presets = loadJson(PRESETS_KEY, {});
  const {mic, output, ...settings} = currentSettings();  // presets are about the voice, not the devices
  presets[name] = settings;
  localStorage.setItem(PRESETS_KEY, JSON.stringify(presets));
  listPresets(name);
}

function loadPreset() {
  const settings = loadJson(PRESETS_KEY, {})[$("preset-list").value];
  if (!settings) return;
  applySettings(settings);
  saveSettings();
  const knobs = knobValues(settings);
  if (Object.keys(knobs).length) send({type: "set", ...knobs});
}

function deletePreset() {
  const presets = loadJson(PRESETS_KEY, {});
  delete presets[$("preset-list").value];
  localStorage.setItem(PRESETS_KEY, JSON.stringify(presets));
  listPresets();
}

// --- streaming ----------------------------------------------------------------------------------

function onMessage(event) {
  if (typeof event.data !== "string") {
    const samples = event.data.byteLength / 4;
    rtsvc.samplesReceived += samples;
    rtsvc.framesReceived += 1;
    if (node) node.port.postMessage(event.data, [event.data]);
    return;
  }
  const message = JSON.parse(event.data);
  if (message.type === "ready") {
    rtsvc.ready = message;
    setState("streaming");
    $("hint").hidden = true;  // the microphone was allowed
    fillSpeakers(message.speakers, message.settings.speaker);
    rtsvc.settings = message.settings;
    applySettings(message.settings);
  } else if (message.type === "settings") {
    rtsvc.settings = message.settings;
    applySettings(message.settings);
  } else if (message.type === "stats") {
    rtsvc.stats = message;
  } else if (message.type === "warning") {  // e.g. the server is behind and answered late input with silence
    rtsvc.warning = message;
    rtsvc.warnings += 1;
    rtsvc.warningAt = performance.now();
    $("warning").textContent = `⚠ ${message.message}` +
      (rtsvc.warnings > 1 ? ` (${rtsvc.warnings} warnings since Start)` : "");
    $("warning").hidden = false;
    showLatency();
  } else if (message.type === "error") {
    rtsvc.error = message;
    setStatus(`server error ${message.code}: ${message.message}`, true);
  }
}

async function start() {
  $("start").disabled = true;
  try {
    setState("starting");
    rtsvc.warnings = 0;
    ctx = new AudioContext({latencyHint: "interactive"});
    if ($("output").value && ctx.setSinkId) await ctx.setSinkId($("output").value);
    await ctx.audioWorklet.addModule("worklet.js");
    const audio = {channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false};
    if ($("mic").value) audio.deviceId = {exact: $("mic").value};
    mic = await navigator.mediaDevices.getUserMedia({audio});
    listDevices();  // labels are only given once the microphone is allowed
    const frames = chunkFrames();
    node = new AudioWorkletNode(ctx, "rtsvc-io", {
      numberOfInputs: 1, numberOfOutputs: 1, outputChannelCount: [2],
      processorOptions: {chunkFrames: frames, prebufferFrames: 2 * frames, maxQueueFrames: 25 * frames},
    });
    ctx.createMediaStreamSource(mic).connect(node);
    node.connect(ctx.destination);
    node.port.onmessage = (e) => {
      if (e.data instanceof ArrayBuffer) {
        // drop microphone audio while the socket is backed up, rather than let latency grow
        if (!ws || ws.readyState !== WebSocket.OPEN || !rtsvc.ready) return;
        if (ws.bufferedAmount > 8 * e.data.byteLength) { rtsvc.backlogSkipped += 1; return; }
        ws.send(e.data);
        rtsvc.samplesSent += e.data.byteLength / 4;
        rtsvc.framesSent += 1;
      } else if (e.data.type === "status") {
        rtsvc.underruns = e.data.underruns;
        rtsvc.dropped = e.data.dropped;
        rtsvc.peakReceived = Math.max(rtsvc.peakReceived, e.data.peak);
        rtsvc.queuedMs = 1000 * e.data.queued / ctx.sampleRate;
        showLevel("meter", e.data.peak);
        showLevel("input-meter", e.data.inPeak);
        showLatency();
      }
    };
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    ws = new WebSocket(`${scheme}//${location.host}` + withToken("/v1/stream"));
    ws.binaryType = "arraybuffer";
    ws.onopen = () => {
      ws.send(JSON.stringify({type: "start", sample_rate: ctx.sampleRate, format: "f32le", channels: 1,
                              warnings: true, ...knobValues(currentSettings())}));
    };
    ws.onmessage = onMessage;
    ws.onclose = (e) => {
      setState("closed");
      if (!rtsvc.error || e.code !== 1000) {
        setStatus(`disconnected (code ${e.code}${e.reason ? ": " + e.reason : ""})`, e.code !== 1000);
      }
      stop();
    };
    statsTimer = setInterval(() => send({type: "stats"}), 1000);
    if (ctx.state === "suspended") setStatus("click anywhere to start audio (browser autoplay policy)");
    $("stop").disabled = false;
  } catch (err) {
    setState("failed");
    rtsvc.error = {code: "page", message: String(err)};
    const blocked = err && err.name === "NotAllowedError";
    setStatus(blocked ? "the microphone is blocked: allow it (the microphone icon in the address bar), " +
      "then Start again" : `cannot start: ${err}`, true);
    $("hint").hidden = false;
    stop();
  }
}

function stop() {
  clearInterval(statsTimer);
  if (ws && ws.readyState === WebSocket.OPEN) ws.close(1000);
  if (mic) mic.getTracks().forEach((t) => t.stop());
  if (ctx) ctx.close();
  ws = node = mic = ctx = null;
  rtsvc.ready = null;
  $("warning").hidden = true;
  $("latency").textContent = "–";
  if (rtsvc.state !== "closed" && rtsvc.state !== "failed") {
    setState("stopped");
    showLatency();  // a disconnect or failure keeps its message
  }
  $("start").disabled = false;
  $("stop").disabled = true;
}

for (const id of ["speaker", "blend-with", "blend"]) $(id).addEventListener("change", () => onControlChange("speaker"));
$("blend").addEventListener("input", () => { document.querySelector("output[for=blend]").value = $("blend").value; });
for (const id of ["mic", "output"]) $(id).addEventListener("change", saveSettings);
$("start").addEventListener("click", start);
$("stop").addEventListener("click", stop);
$("preset-save").addEventListener("click", savePreset);
$("preset-load").addEventListener("click", loadPreset);
$("preset-delete").addEventListener("click", deletePreset);
document.addEventListener("click", () => { if (ctx && ctx.state === "suspended") ctx.resume(); });
if (params.get("obs") === "1") document.body.classList.add("obs");
listPresets();
Promise.all([listDevices().catch(() => {}), loadInfo()])
  .then(() => { rtsvc.panelReady = true; if (params.get("autostart") === "1") start(); })
  .catch((err) => { rtsvc.error = {code: "page", message: String(err)}; setStatus(`cannot load: ${err}`, true); });
