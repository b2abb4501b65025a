// AudioWorklet for the rtsvc page: cuts the microphone into fixed chunks for the websocket and
// plays the converted audio that comes back through a small jitter buffer.
// Runs on the audio rendering thread: no allocation per render quantum except for full chunks.

class RtsvcIo extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = options.processorOptions || {};
    this.chunkFrames = opts.chunkFrames || 960;          // frames per websocket frame (20 ms at 48 kHz)
    this.prebufferFrames = opts.prebufferFrames || 2 * this.chunkFrames;
    this.maxQueueFrames = opts.maxQueueFrames || 25 * this.chunkFrames;
    this.chunk = new Float32Array(this.chunkFrames);
    this.fill = 0;
    this.queue = [];            // Float32Arrays waiting to play
    this.readPos = 0;           // position inside queue[0]
    this.queued = 0;            // frames waiting in total
    this.playing = false;       // false while (re)filling the jitter buffer
    this.underruns = 0;
    this.dropped = 0;
    this.peak = 0;
    this.inPeak = 0;
    this.sinceReport = 0;
    this.port.onmessage = (e) => this.enqueue(new Float32Array(e.data));
  }

  enqueue(samples) {
    this.queue.push(samples);
    this.queued += samples.length;
    // more than maxQueueFrames waiting means latency is piling up: drop the oldest audio
    while (this.queued > this.maxQueueFrames && this.queue.length > 1) {
      const head = this.queue.shift();
      const left = head.length - this.readPos;
      this.queued -= left;
      this.dropped += left;
      this.readPos = 0;
    }
  }

  capture(input) {
    const n = input ? input.length : 128;
    for (let i = 0; i < n; i++) {
      const v = input ? input[i] : 0;
      this.chunk[this.fill++] = v;
      const a = v < 0 ? -v : v;
      if (a > this.inPeak) this.inPeak = a;
      if (this.fill === this.chunkFrames) {
        this.port.postMessage(this.chunk.buffer, [this.chunk.buffer]);
        this.chunk = new Float32Array(this.chunkFrames);
        this.fill = 0;
      }
    }
  }

  play(out) {
    if (!this.playing && this.queued >= this.prebufferFrames) this.playing = true;
    let i = 0;
    while (this.playing && i < out.length) {
      if (this.queue.length === 0) { this.playing = false; this.underruns++; break; }
      const head = this.queue[0];
      const n = Math.min(out.length - i, head.length - this.readPos);
      for (let k = 0; k < n; k++) {
        const v = head[this.readPos + k];
        out[i + k] = v;
        const a = v < 0 ? -v : v;
        if (a > this.peak) this.peak = a;
      }
      i += n; this.readPos += n; this.queued -= n;
      if (this.readPos === head.length) { this.queue.shift(); this.readPos = 0; }
    }
    out.fill(0, i);
  }

  process(inputs, outputs) {
    const input = inputs[0] && inputs[0].length ? inputs[0][0] : null;
    this.capture(input);
    const out = outputs[0][0];
    this.play(out);
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);
    this.sinceReport += out.length;
    if (this.sinceReport >= sampleRate / 4) {
      this.port.postMessage({type: "status", queued: this.queued, underruns: this.underruns,
                             dropped: this.dropped, peak: this.peak, inPeak: this.inPeak});
      this.sinceReport = 0; this.peak = 0; this.inPeak = 0;
    }
    return true;
  }
}

registerProcessor("rtsvc-io", RtsvcIo);
