// rtsvc page: microphone -> ws /v1/stream (f32le at the AudioContext rate) -> speakers.
// URL options: ?token=T (servers started with --token), ?autostart=1 (OBS), ?speaker=S,
// ?pitch=N (semitones), ?obs=1 (transparent background), ?chunk_ms=20.
"use strict";

const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);
const KNOBS = ["pitch_shift", "formant_shift", "input_gain_db", "output_gain_db", "gate_db"];

// read by tests (headless Chromium) and handy in the devtools console
const rtsvc = window.rtsvc = {
  state: "stopped", error: null, ready: null, settings: null, stats: null,
  samplesSent: 0, samplesReceived: 0, framesSent: 0, framesReceived: 0, peakReceived: 0,
  underruns: 0, dropped: 0, queuedMs: 0, backlogSkipped: 0,
};

let ctx = null, ws = null, node = null, mic = null, statsTimer = null;

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").classList.toggle("error", !!isError);
}

function showLatency() {
  if (!rtsvc.ready || !ctx) return;
  const engine = rtsvc.ready.latency_ms;
  const device = 1000 * ((ctx.baseLatency || 0) + (ctx.outputLatency || 0));
  const chunk = 1000 * chunkFrames() / ctx.sampleRate;
  const total = engine + rtsvc.queuedMs + device + chunk;
  let text = `streaming at ${ctx.sampleRate} Hz\n` +
    `latency ≈ ${total.toFixed(0)} ms (engine ${engine.toFixed(0)} + chunk ${chunk.toFixed(0)} + ` +
    `buffer ${rtsvc.queuedMs.toFixed(0)} + device ${device.toFixed(0)})\n` +
    `underruns ${rtsvc.underruns}, dropped ${rtsvc.dropped} samples`;
  if (rtsvc.stats && rtsvc.stats.compute_ms_mean !== undefined) {
    text += `, compute ${Number(rtsvc.stats.compute_ms_mean).toFixed(1)} ms/block`;
  }
  setStatus(text);
}

function chunkFrames() {
  const ms = Number(params.get("chunk_ms") || 20);
  return Math.max(128, Math.round(ctx.sampleRate * ms / 1000));
}

function send(message) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(message));
}

function fillSpeakers(speakers, current) {
  const select = $("speaker");
  select.textContent = "";
  for (const name of speakers) {
    const option = document.createElement("option");
    option.value = option.textContent = name;
    select.appendChild(option);
  }
  if (current) select.value = current;
}

function applySettings(settings) {
  rtsvc.settings = settings;
  for (const name of KNOBS) {
    if (settings[name] === undefined) continue;
    $(name).value = settings[name];
    document.querySelector(`output[for=${name}]`).value = settings[name];
  }
  if (settings.speaker) $("speaker").value = settings.speaker;
}

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
    rtsvc.state = "streaming";
    fillSpeakers(message.speakers, message.settings.speaker);
    applySettings(message.settings);
    showLatency();
  } else if (message.type === "settings") {
    applySettings(message.settings);
  } else if (message.type === "stats") {
    rtsvc.stats = message;
  } else if (message.type === "error") {
    rtsvc.error = message;
    setStatus(`server error ${message.code}: ${message.message}`, true);
  }
}

async function start() {
  $("start").disabled = true;
  try {
    rtsvc.state = "starting";
    ctx = new AudioContext({latencyHint: "interactive"});
    await ctx.audioWorklet.addModule("worklet.js");
    mic = await navigator.mediaDevices.getUserMedia({audio: {
      channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false}});
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
        $("meter").style.width = `${Math.min(100, 100 * e.data.peak)}%`;
        showLatency();
      }
    };
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const token = params.get("token");
    ws = new WebSocket(`${scheme}//${location.host}/v1/stream` + (token ? `?token=${encodeURIComponent(token)}` : ""));
    ws.binaryType = "arraybuffer";
    ws.onopen = () => {
      const start = {type: "start", sample_rate: ctx.sampleRate, format: "f32le", channels: 1};
      if (params.get("speaker")) start.speaker = params.get("speaker");
      if (params.get("pitch")) start.pitch_shift = Number(params.get("pitch"));
      ws.send(JSON.stringify(start));
    };
    ws.onmessage = onMessage;
    ws.onclose = (e) => {
      rtsvc.state = "closed";
      if (!rtsvc.error || e.code !== 1000) {
        setStatus(`disconnected (code ${e.code}${e.reason ? ": " + e.reason : ""})`, e.code !== 1000);
      }
      stop();
    };
    statsTimer = setInterval(() => send({type: "stats"}), 1000);
    if (ctx.state === "suspended") setStatus("click anywhere to start audio (browser autoplay policy)");
    $("stop").disabled = false;
  } catch (err) {
    rtsvc.state = "failed";
    rtsvc.error = {code: "page", message: String(err)};
    setStatus(`cannot start: ${err}`, true);
    stop();
  }
}

function stop() {
  clearInterval(statsTimer);
  if (ws && ws.readyState === WebSocket.OPEN) ws.close(1000);
  if (mic) mic.getTracks().forEach((t) => t.stop());
  if (ctx) ctx.close();
  ws = node = mic = ctx = null;
  if (rtsvc.state !== "closed" && rtsvc.state !== "failed") rtsvc.state = "stopped";
  $("start").disabled = false;
  $("stop").disabled = true;
}

for (const name of KNOBS) {
  const input = $(name);
  const label = document.querySelector(`output[for=${name}]`);
  input.addEventListener("input", () => { label.value = input.value; });
  input.addEventListener("change", () => send({type: "set", [name]: Number(input.value)}));
}
$("speaker").addEventListener("change", () => send({type: "set", speaker: $("speaker").value}));
$("start").addEventListener("click", start);
$("stop").addEventListener("click", stop);
document.addEventListener("click", () => { if (ctx && ctx.state === "suspended") ctx.resume(); });
if (params.get("obs") === "1") document.body.classList.add("obs");
if (params.get("autostart") === "1") start();
