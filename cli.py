"""The `rtsvc` command line. Thin: parse options, call the library, print results.

Every user mistake surfaces as `rtsvc.errors.UserError`, printed as one line with exit code 2.
Options shared by several commands are defined once below (`Annotated` aliases); their defaults
and the "Default: ..." in their help come from the library's dataclasses (`Knobs`, `StreamConfig`,
`ServerConfig`), so a default changed there shows up here.
"""

import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from rtsvc.autoblock import P99_MARGIN, resolve_block, resolve_block_choice
from rtsvc.engine import StreamConfig, parse_block_ms
from rtsvc.errors import UserError
from rtsvc.live import AUDIO_API, DEVICE_BLOCK_MS, JITTER_MS, PULSE_BUFFER_MS
from rtsvc.serve.server import ServerConfig
from rtsvc.settings import MAX_PITCH_SHIFT, MAX_STEPS, SCHEDULES, Knobs
from rtsvc.voices.defaults import DIT_CONTEXT_MS, DSP_BLOCK_MS, MODEL_BLOCK_MS
from rtsvc.voices.spec import CONCURRENT_F0, VoiceSpec, check_f0, describe_voice, open_voice, sampling_steps

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="rtsvc: real-time voice conversion with RIFT-SVC models (live, websocket, files, training).",
)
console = Console(stderr=True)
KNOBS, STREAM, SERVER = Knobs(), StreamConfig(), ServerConfig()
CONVERT_STEPS = 32  # offline conversion: upstream infer.py's default sampling steps
BENCH_BLOCKS, BENCH_STEPS = "50,100,150,250", "2,4,8"  # rtsvc bench grids (ms, steps)
STREAMS_BATCHES, STREAMS_THREADS = "1,8", 1  # rtsvc bench --streams: compared max batches, torch threads
GAP_CROSSFADES, GAP_SEARCHES = "5,10,25,50", "0,5,10,20"  # rtsvc bench --gap grids (ms)

# --- options shared by several commands ------------------------------------------------------


def _opt(kind: type, help: str, *names: str):
    """A shared option: `name: Alias = default` in each command (typer.Option inside Annotated)."""
    return Annotated[kind, typer.Option(*names, help=help)]


# train and distill
TrainPrecision = _opt(str, "auto, fp32, bf16 or fp16 (autocast). Default: auto (bf16 on a CUDA GPU that has "
                      "it, else fp32).")
LogEvery = _opt(int, "Steps between metrics.jsonl lines. Default: 10.")
NumWorkers = _opt(int, "DataLoader worker processes. Default: 2.")
TrainSeed = _opt(int, "Random seed (batches, crops, noise). Default: 2025.")
Resume = _opt(bool, "Continue OUT/last.ckpt at its exact step. Default: off.")
TrainDevice = _opt(str, "Torch device: auto, cpu or cuda. Default: auto (under torchrun: one GPU per rank).")

Model = _opt(Path | None, "RIFT-SVC V2 or V3 checkpoint (.ckpt, LoRA fine-tunes too) or exported .rtsvc "
             "bundle. Default: none, the built-in DSP voice.", "--model", "-m")
Speaker = _opt(str | None, "Target speaker name. Default: the model's default (first) speaker; a voice you "
               "fine-tuned is its model's default.")
ServeSpeaker = _opt(str | None, "Target speaker for new clients (each client may choose another). Default: "
                    "the model's default (first) speaker.")
PretrainedDir = _opt(Path, "Folder of pretrained components in the upstream layout. Default: pretrained/.")
ContentVec = _opt(str | None, "ContentVec folder or hub id. Default: PRETRAINED_DIR/content-vec-best.")
Whisper = _opt(str | None, "Whisper folder or hub id (V2 models only). Default: "
               "PRETRAINED_DIR/whisper-large-v3.")
Vocoder = _opt(Path | None, "NSF-HiFiGAN model.ckpt (config.json beside it). Default: PRETRAINED_DIR/"
               "nsf_hifigan_44.1k_hop512_128bin_2024.02/model.ckpt (a .rtsvc bundle has its own).")
Rmvpe = _opt(Path | None, "RMVPE model.pt. Default: PRETRAINED_DIR/rmvpe/model.pt.")
F0 = _opt(str | None, "F0 extractor for models: rmvpe, fcpe or pyworld (the DSP voice always uses "
          "pyworld). Default: rmvpe.")
Device = _opt(str, "Torch device: auto, cpu or cuda. Default: auto (CUDA if present).")
Backend = _opt(str, "Model backend: auto, torch or onnx. Default: auto (onnx for .rtsvc bundles, torch "
               "for .ckpt).")
Precision = _opt(str, "Torch compute precision on CUDA: fp32, fp16 or bf16 (CPU always fp32). Default: fp32.")
Providers = _opt(str | None, "ONNX Runtime providers for .rtsvc bundles, in order, e.g. cuda,cpu (tensorrt, "
                 "cuda, cpu). Default: automatic (the first of TensorRT, CUDA that starts here, then CPU).")

Pitch = _opt(float, f"Pitch shift in semitones (±{MAX_PITCH_SHIFT:g}). Default: {KNOBS.pitch_shift:g}.")
Formant = _opt(float, f"Formant shift factor, DSP voice only (0.5-2.0). Default: {KNOBS.formant_shift:g}.")
Gate = _opt(float, "Noise gate in dBFS (-120 to 0): quieter blocks give silence and skip the voice. "
            f"Default: {KNOBS.gate_db:g}.")
InputGain = _opt(float, f"Input gain in dB (±40). Default: {KNOBS.input_gain_db:g}.")
OutputGain = _opt(float, f"Output gain in dB (±40). Default: {KNOBS.output_gain_db:g}.")
Steps = _opt(int | None, f"Rectified-flow sampling steps (grid points) for models while streaming "
             f"(2-{MAX_STEPS}). Default: {KNOBS.steps}; a distilled student: its own count (1 evaluation = "
             "2 points).")
Schedule = _opt(str, f"Where the sampling grid points fall for a teacher model: {', '.join(SCHEDULES)} "
                "(docs/training.md; a distilled student always uses its own grid). "
                f"Default: {KNOBS.schedule}.")
Denoise = _opt(str, "Noise suppression on the input before conversion: off, deepfilternet (DeepFilterNet3, "
               "+52 ms latency) or rnnoise (RNNoise, cheaper, +42 ms). Default: off.")
CfgStrength = _opt(float, "V2 models: classifier-free guidance strength on Whisper (0-10, 0 = off). "
                   f"Default: {KNOBS.cfg_strength:g}.")
DsCfg = _opt(float, "V3 models: content-degradation guidance strength (0-10, 0 = off and its pass skipped). "
             f"Default: {KNOBS.ds_cfg_strength:g}.")
SpkCfg = _opt(float, "V3 models: speaker guidance strength, against the null speaker (0-10, 0 = off). "
              f"Default: {KNOBS.spk_cfg_strength:g}.")
SkipCfg = _opt(float, "V3 models: skip-layer guidance strength (0-10, 0 = off). "
               f"Default: {KNOBS.skip_cfg_strength:g}.")
SkipLayers = _opt(int, "V3 models: the DiT block (0-based) the skip-layer guidance pass bypasses; upstream "
                  f"suggests depth/2; -1 = none. Default: {KNOBS.cfg_skip_layers}.")
Rescale = _opt(float, "V3 models: guidance rescale towards the unguided velocity's std (0-1, 0 = off). "
               f"Default: {KNOBS.cfg_rescale:g}.")

BLOCK_AUTO = ("auto = measured at start on this machine: the shortest block whose p99 compute is at most "
              f"{P99_MARGIN:g} of it, searched from {DSP_BLOCK_MS:g} ms (46.4 ms) for the DSP voice, "
              f"{MODEL_BLOCK_MS:g} ms (150.9 ms) with --model")
BlockMs = Annotated[str, typer.Option(metavar="MS|auto", help="Engine block length in ms, or auto (latency "
                                      "and compute per block; rounded to 11.6 ms mel frames). "
                                      f"Default: {BLOCK_AUTO}.")]
DitContextMs = _opt(float, "Left context in ms the model's DiT samples before the frames it outputs while "
                    "streaming (>= 0; longer than --context-ms = the whole window; longer costs more DiT "
                    f"time). Models only. Default: {DIT_CONTEXT_MS:g}.")
ContextMs = _opt(float, f"Left context per block in ms. Default: {STREAM.context_ms:g}.")
CrossfadeMs = _opt(float, f"SOLA crossfade in ms. Default: {STREAM.crossfade_ms:g}.")
SolaSearchMs = _opt(float, f"SOLA search window in ms. Default: {STREAM.sola_search_ms:g}.")
MaxBatch = _opt(int, "Model voices: most clients' blocks run as one batch through every model stage (F0, "
                f"encoders, DiT, vocoder; 1 = each block alone). Default: {SERVER.max_batch}.")
BatchRunners = _opt(int, "With --max-batch > 1: threads that run batches (a spare one starts only when a "
                    "block would otherwise be late; fewer did better on a machine busy with other "
                    f"work). Default: {SERVER.batch_runners} (one per CPU core, at most 8).")
BatchDeadlineMs = _opt(float, "Longest a block waits in ms for other clients' blocks that are expected soon "
                       "(never past its real-time budget of one block). Default: "
                       f"{SERVER.batch_deadline_ms:g}.")
ConcurrentF0 = _opt(bool, "Model voices while streaming: extract F0 on a second thread while ContentVec runs "
                    "(same output; faster where a core is free; a bundle's encoders then take one thread "
                    "unless --threads is given; docs/benchmarks.md issue 14). Default: "
                    f"{'on' if CONCURRENT_F0 else 'off'}.", "--concurrent-f0/--no-concurrent-f0")
Threads = _opt(int | None, "CPU threads for torch and for each ONNX Runtime session. Default: torch 1 while "
               "streaming on a CPU (steadiest on a busy machine), ONNX Runtime its own (every core).")


def _progress_bar():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=False)


def _say(text: str) -> None:
    console.print(text, highlight=False, soft_wrap=True)


def _table(title: str, columns: tuple[str, ...], rows) -> None:
    """Print a table on stdout: the first column left-aligned, numbers right-aligned."""
    from rich.table import Table

    table = Table(title=title)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


# --- commands, in the order people use them ---------------------------------------------------


@app.command()
def live(
    model: Model = None, speaker: Speaker = None, pretrained_dir: PretrainedDir = Path("pretrained"),
    input: str | None = typer.Option(None, "--input", "-i", help="Input device: index or (part of) its "
                                     "name, PulseAudio/PipeWire sources by name; see `rtsvc devices`. "
                                     "Default: the system default input."),
    output: str | None = typer.Option(None, "--output", "-o", help="Output device (or virtual cable): index "
                                      "or (part of) its name. Default: the system default output."),
    monitor: str | None = typer.Option(None, help="Also play the converted voice on this device (e.g. "
                                       "headphones while --output is a virtual cable), at the output rate. "
                                       "Default: none."),
    input_rate: int | None = typer.Option(None, help="Input device rate in Hz. Default: the device's."),
    output_rate: int | None = typer.Option(None, help="Output device rate in Hz. Default: the device's."),
    pitch: Pitch = KNOBS.pitch_shift, formant: Formant = KNOBS.formant_shift, gate: Gate = KNOBS.gate_db,
    input_gain: InputGain = KNOBS.input_gain_db, output_gain: OutputGain = KNOBS.output_gain_db,
    steps: Steps = None, schedule: Schedule = KNOBS.schedule, cfg_strength: CfgStrength = KNOBS.cfg_strength,
    denoise: Denoise = KNOBS.denoise,
    ds_cfg_strength: DsCfg = KNOBS.ds_cfg_strength, spk_cfg_strength: SpkCfg = KNOBS.spk_cfg_strength,
    skip_cfg_strength: SkipCfg = KNOBS.skip_cfg_strength, cfg_skip_layers: SkipLayers = KNOBS.cfg_skip_layers,
    cfg_rescale: Rescale = KNOBS.cfg_rescale,
    block_ms: BlockMs = "auto", context_ms: ContextMs = STREAM.context_ms,
    crossfade_ms: CrossfadeMs = STREAM.crossfade_ms, sola_search_ms: SolaSearchMs = STREAM.sola_search_ms,
    dit_context_ms: DitContextMs = DIT_CONTEXT_MS, concurrent_f0: ConcurrentF0 = CONCURRENT_F0,
    threads: Threads = None,
    jitter_ms: str = typer.Option("auto", help="Output buffer primed with this much silence (ms) to absorb "
                                  "block-to-block changes in compute time; auto = with --block-ms auto, the "
                                  "picked block's measured headroom (block minus mean compute, at least "
                                  f"{JITTER_MS:g}), else {JITTER_MS:g}. Default: auto."),
    duration: float | None = typer.Option(None, help="Stop after this many seconds and exit 0. Default: "
                                          "run until Ctrl-C, SIGTERM or q."),
    audio_api: str = typer.Option(AUDIO_API, help="How to reach the sound devices: portaudio (any "
                                  "device) or pulse (PulseAudio/PipeWire sources and sinks through libpulse, "
                                  f"explicit buffer sizes; needs pasimple). Default: {AUDIO_API}."),
    device_buffer_ms: str = typer.Option("low", metavar="MS|low", help="Device buffering asked for per "
                                         "stream in ms: PortAudio's suggested latency, or the pulse playback "
                                         "buffer; low = PortAudio's low default (pulse: "
                                         f"{PULSE_BUFFER_MS:g} ms). Default: low."),
    device_block_ms: float = typer.Option(DEVICE_BLOCK_MS, help="Device callback size in ms. Default: "
                                          f"{DEVICE_BLOCK_MS:g}."),
    pipeline: bool = typer.Option(False, help="Models: extract block n+1's features while block n's "
                                  "DiT and vocoder run (two threads; same output; --block-ms auto then needs "
                                  "only the slower half to fit). Default: off."),
    record: Path | None = typer.Option(None, help="Also write the converted output to this audio file "
                                       "(output device rate). Default: none."),
    f0: F0 = None, device: Device = "auto", backend: Backend = "auto", precision: Precision = "fp32",
    providers: Providers = None, contentvec: ContentVec = None, whisper: Whisper = None,
    vocoder: Vocoder = None, rmvpe: Rmvpe = None,
) -> None:
    """Microphone -> voice -> speaker in real time. Keys: up/down pitch, f/F formant, g/G gate, q quit."""
    from rtsvc.live import (
        auto_jitter_ms,
        check_live_options,
        find_devices,
        live_summary,
        parse_device_buffer_ms,
        parse_jitter_ms,
        run_live,
    )
    from rtsvc.settings import RuntimeSettings, validate_knobs

    knobs = validate_knobs(Knobs(speaker=speaker, pitch_shift=pitch, formant_shift=formant, gate_db=gate,
                                 input_gain_db=input_gain, output_gain_db=output_gain,
                                 steps=steps or KNOBS.steps, schedule=schedule,
                                 cfg_strength=cfg_strength, ds_cfg_strength=ds_cfg_strength,
                                 spk_cfg_strength=spk_cfg_strength, skip_cfg_strength=skip_cfg_strength,
                                 cfg_skip_layers=cfg_skip_layers, cfg_rescale=cfg_rescale, denoise=denoise))
    config = StreamConfig(parse_block_ms(block_ms), context_ms, crossfade_ms, sola_search_ms).validate()
    jitter = parse_jitter_ms(jitter_ms)
    buffer_ms = parse_device_buffer_ms(device_buffer_ms)
    check_live_options(input_rate, output_rate, duration)
    spec = VoiceSpec(model=model, pretrained_dir=pretrained_dir, contentvec=contentvec, whisper=whisper,
                     vocoder=vocoder, rmvpe=rmvpe, backend=backend, device=device, f0=f0, precision=precision,
                     speaker=speaker, providers=providers, streaming=True, dit_context_ms=dit_context_ms,
                     concurrent_f0=concurrent_f0, threads=threads)
    spec.validate()  # a wrong --model is said first
    dev_in, dev_out, dev_mon = find_devices(input, output, monitor)  # before a model loads
    voice = open_voice(spec)
    knobs = sampling_steps(knobs, voice, steps)
    # auto: measured here
    config, choice = resolve_block_choice(voice, config, knobs, say=_say, pipelined=pipeline)
    if jitter is None:
        jitter = auto_jitter_ms(choice)
        if choice is not None:
            _say(f"auto jitter buffer: {jitter:.0f} ms (the block's headroom over its mean compute)")
    _say(describe_voice(voice, model, speaker))
    result = run_live(voice, RuntimeSettings(knobs), config, input_device=dev_in,
                      output_device=dev_out, monitor_device=dev_mon, input_rate=input_rate,
                      output_rate=output_rate, duration=duration, record=record, jitter_ms=jitter,
                      console=console, audio_api=audio_api, device_block_ms=device_block_ms,
                      device_buffer_ms=buffer_ms, pipeline=pipeline)
    _say(live_summary(result, record))


@app.command()
def serve(
    model: Model = None, speaker: ServeSpeaker = None, pretrained_dir: PretrainedDir = Path("pretrained"),
    host: str = typer.Option(SERVER.host, help="Address to listen on; anything but loopback needs --token. "
                             f"Default: {SERVER.host}."),
    port: int = typer.Option(SERVER.port, help=f"TCP port for the websocket, /healthz and the page. "
                             f"Default: {SERVER.port}."),
    token: str | None = typer.Option(None, envvar="RTSVC_TOKEN", help="Shared secret clients must send "
                                     "(start message or ?token=), at least 8 characters. Default: none "
                                     "(loopback only). Also read from $RTSVC_TOKEN."),
    max_clients: int = typer.Option(SERVER.max_clients, help="Most simultaneous streams; more are refused "
                                    f"with close code 1013. Default: {SERVER.max_clients}."),
    max_frame_bytes: int = typer.Option(SERVER.max_frame_bytes, help="Largest binary frame in bytes (close "
                                        f"code 1009 above it). Default: {SERVER.max_frame_bytes} "
                                        f"({SERVER.max_frame_bytes / 2**20:g} MiB)."),
    idle_timeout: float = typer.Option(SERVER.idle_timeout_s, help="Seconds without any message before a "
                                       f"client is closed (code 1008). Default: {SERVER.idle_timeout_s:g}."),
    allowed_origin: list[str] | None = typer.Option(None, help="Extra browser origin allowed to connect "
                                                    "(repeatable; '*' allows any). The page's own origin "
                                                    "and non-browser clients are always allowed. "
                                                    "Default: none."),
    workers: int = typer.Option(SERVER.workers, help="Inference threads shared by all clients. Default: "
                                f"{SERVER.workers} (one per CPU core, at most 8)."),
    max_lag_ms: float = typer.Option(SERVER.max_lag_ms, help="Live input not converted this many "
                                     "milliseconds after it was due is answered with silence, so latency "
                                     f"stays bounded under overload. Default: {SERVER.max_lag_ms:g}."),
    send_timeout: float = typer.Option(SERVER.send_timeout_s, help="Seconds a client may leave its replies "
                                       "unread before it is dropped (code 1008). Default: "
                                       f"{SERVER.send_timeout_s:g}."),
    max_batch: MaxBatch = SERVER.max_batch, batch_deadline_ms: BatchDeadlineMs = SERVER.batch_deadline_ms,
    batch_runners: BatchRunners = SERVER.batch_runners,
    ray: str | None = typer.Option(None, metavar="ADDRESS|auto", help="Deploy as a Ray Serve application "
                                   "(needs the ray extra of rtsvc) on the cluster at ADDRESS, or auto "
                                   "($RAY_ADDRESS, else a private local instance stopped with the command). "
                                   "Default: off (one process)."),
    replicas: int = typer.Option(2, help="--ray: replicas, each holding the voice and its clients. "
                                 "Default: 2."),
    replica_cpus: float = typer.Option(0.0, help="--ray: CPUs Ray reserves per replica. Default: 0."),
    replica_gpus: float = typer.Option(0.0, help="--ray: GPUs per replica (e.g. 1, or 0.5 to share one). "
                                       "Default: 0."),
    pitch: Pitch = KNOBS.pitch_shift, formant: Formant = KNOBS.formant_shift, gate: Gate = KNOBS.gate_db,
    input_gain: InputGain = KNOBS.input_gain_db, output_gain: OutputGain = KNOBS.output_gain_db,
    steps: Steps = None, schedule: Schedule = KNOBS.schedule, cfg_strength: CfgStrength = KNOBS.cfg_strength,
    denoise: Denoise = KNOBS.denoise,
    ds_cfg_strength: DsCfg = KNOBS.ds_cfg_strength, spk_cfg_strength: SpkCfg = KNOBS.spk_cfg_strength,
    skip_cfg_strength: SkipCfg = KNOBS.skip_cfg_strength, cfg_skip_layers: SkipLayers = KNOBS.cfg_skip_layers,
    cfg_rescale: Rescale = KNOBS.cfg_rescale,
    block_ms: BlockMs = "auto", context_ms: ContextMs = STREAM.context_ms,
    crossfade_ms: CrossfadeMs = STREAM.crossfade_ms, sola_search_ms: SolaSearchMs = STREAM.sola_search_ms,
    dit_context_ms: DitContextMs = DIT_CONTEXT_MS,
    f0: F0 = None, device: Device = "auto", backend: Backend = "auto", precision: Precision = "fp32",
    providers: Providers = None, contentvec: ContentVec = None, whisper: Whisper = None,
    vocoder: Vocoder = None, rmvpe: Rmvpe = None,
) -> None:
    """Serve the websocket streaming endpoint (protocol v1), /healthz and the browser page for OBS.

    Knob options (pitch, gate, gains, steps...) are the defaults for new clients, which may change them.
    """
    from rtsvc.serve.server import check_config, dsp_source, model_source
    from rtsvc.serve.server import serve as run_server
    from rtsvc.settings import validate_knobs

    config = ServerConfig(host=host, port=port, token=token, max_clients=max_clients,
                          max_frame_bytes=max_frame_bytes, idle_timeout_s=idle_timeout,
                          allowed_origins=tuple(allowed_origin or ()), workers=workers,
                          max_lag_ms=max_lag_ms, send_timeout_s=send_timeout,
                          max_batch=max_batch, batch_deadline_ms=batch_deadline_ms,
                          batch_runners=batch_runners)
    check_config(config)  # refuse an open bind without a token before loading any model
    knobs = validate_knobs(Knobs(speaker=speaker, pitch_shift=pitch, formant_shift=formant, gate_db=gate,
                                 input_gain_db=input_gain, output_gain_db=output_gain,
                                 steps=steps or KNOBS.steps, schedule=schedule,
                                 cfg_strength=cfg_strength, ds_cfg_strength=ds_cfg_strength,
                                 spk_cfg_strength=spk_cfg_strength, skip_cfg_strength=skip_cfg_strength,
                                 cfg_skip_layers=cfg_skip_layers, cfg_rescale=cfg_rescale, denoise=denoise))
    stream_config = StreamConfig(parse_block_ms(block_ms), context_ms, crossfade_ms,
                                 sola_search_ms).validate()
    spec = VoiceSpec(
        model=model, pretrained_dir=pretrained_dir, contentvec=contentvec, whisper=whisper, vocoder=vocoder,
        rmvpe=rmvpe, backend=backend, device=device, f0=f0, precision=precision, speaker=speaker,
        providers=providers, streaming=True, dit_context_ms=dit_context_ms)
    if ray is not None:  # every replica opens the voice itself
        from rtsvc.serve.ray_serve import RayOptions, serve_on_ray

        options = RayOptions(ray, replicas, replica_cpus, replica_gpus, steps)
        where = f"{host}:{port}"
        serve_on_ray(config, spec.validate(), knobs, stream_config, options, on_ready=lambda: _say(
            f"rtsvc serving on Ray Serve ({replicas} replicas) at http://{where}/ and "
            f"ws://{where}/v1/stream; Ctrl-C stops"))
        return
    voice = open_voice(spec)
    knobs = sampling_steps(knobs, voice, steps)
    source = dsp_source() if model is None else model_source(voice, model.name)
    _say(describe_voice(voice, model, speaker))
    stream_config = resolve_block(voice, stream_config, knobs, say=_say)  # auto: measured here

    def ready(server) -> None:
        where = f"{host}:{server.port}"
        _say(f"rtsvc serving {source.name} voice on http://{where}/ (page, /healthz) and "
             f"ws://{where}/v1/stream; Ctrl-C or SIGTERM stops")

    run_server(config, source, knobs, stream_config, on_ready=ready)


@app.command()
def convert(
    input: Path = typer.Argument(..., help="Input audio file (wav, flac, ogg, mp3; any rate; mixed to "
                                 "mono)."),
    output: Path = typer.Argument(..., help="Output file, 44.1 kHz mono; format from the extension (.wav, "
                                  ".flac, .ogg)."),
    model: Model = None, speaker: Speaker = None, pretrained_dir: PretrainedDir = Path("pretrained"),
    contentvec: ContentVec = None, whisper: Whisper = None, vocoder: Vocoder = None, rmvpe: Rmvpe = None,
    steps: int | None = typer.Option(None, help=f"Rectified-flow sampling steps (grid points, "
                                     f"2-{MAX_STEPS}). Default: {CONVERT_STEPS} (with --stream too); a "
                                     "distilled student: its own count (1 evaluation = 2 points)."),
    schedule: Schedule = KNOBS.schedule,
    cfg_strength: CfgStrength = KNOBS.cfg_strength, ds_cfg_strength: DsCfg = KNOBS.ds_cfg_strength,
    spk_cfg_strength: SpkCfg = KNOBS.spk_cfg_strength, skip_cfg_strength: SkipCfg = KNOBS.skip_cfg_strength,
    cfg_skip_layers: SkipLayers = KNOBS.cfg_skip_layers, cfg_rescale: Rescale = KNOBS.cfg_rescale,
    pitch: Pitch = KNOBS.pitch_shift, formant: Formant = KNOBS.formant_shift,
    denoise: Denoise = KNOBS.denoise, f0: F0 = None,
    seed: int = typer.Option(KNOBS.seed, help=f"Random seed of the sampler noise (integer). "
                             f"Default: {KNOBS.seed}."),
    device: Device = "auto", backend: Backend = "auto", providers: Providers = None,
    precision: Precision = "fp32",
    restore_loudness: bool = typer.Option(False, help="Give each slice back its input loudness instead of "
                                          "the model's -18 LUFS. Default: off."),
    stream: bool = typer.Option(False, help="Convert through the streaming engine block by block (what "
                                "live/serve hear) instead of offline slices. Default: off."),
    block_ms: BlockMs = "auto", context_ms: ContextMs = STREAM.context_ms,
    crossfade_ms: CrossfadeMs = STREAM.crossfade_ms, sola_search_ms: SolaSearchMs = STREAM.sola_search_ms,
    dit_context_ms: DitContextMs = DIT_CONTEXT_MS, concurrent_f0: ConcurrentF0 = CONCURRENT_F0,
) -> None:
    """Convert a recording offline into the target voice (or through the DSP voice with no --model)."""
    from rtsvc.offline import TARGET_LUFS, check_input_file, check_output_path, convert_file, stream_file
    from rtsvc.settings import validate_knobs

    check_f0(f0)
    knobs = validate_knobs(Knobs(speaker=speaker, pitch_shift=pitch, formant_shift=formant,
                                 cfg_strength=cfg_strength, ds_cfg_strength=ds_cfg_strength,
                                 spk_cfg_strength=spk_cfg_strength, skip_cfg_strength=skip_cfg_strength,
                                 cfg_skip_layers=cfg_skip_layers, cfg_rescale=cfg_rescale,
                                 steps=steps or CONVERT_STEPS, schedule=schedule, seed=seed, denoise=denoise))
    config = StreamConfig(parse_block_ms(block_ms), context_ms, crossfade_ms, sola_search_ms).validate()
    check_output_path(output, input)
    check_input_file(input)  # before any model loads; read block by block
    if model is None and f0 not in (None, "pyworld"):
        _say(f"note: the DSP voice uses pyworld for F0; --f0 {f0} is ignored")
    if model is not None and formant != 1.0:
        _say("note: --formant applies to the DSP voice only; ignored with --model")
    voice = open_voice(VoiceSpec(
        model=model, pretrained_dir=pretrained_dir, contentvec=contentvec, whisper=whisper, vocoder=vocoder,
        rmvpe=rmvpe, backend=backend, device=device, f0=f0, precision=precision, speaker=speaker,
        providers=providers, streaming=stream, dit_context_ms=dit_context_ms, concurrent_f0=concurrent_f0))
    knobs = sampling_steps(knobs, voice, steps)
    _say(describe_voice(voice, model, speaker))
    if stream:
        config = resolve_block(voice, config, knobs, say=_say)  # auto: measured here
    with _progress_bar() as bar:
        task = bar.add_task("streaming" if stream else "converting", total=None)
        update = lambda done, total: bar.update(task, completed=done, total=total)  # noqa: E731
        if stream:  # block by block through the engine, as live/serve would hear it
            seconds = stream_file(voice, input, output, knobs, config, progress=update)
        else:  # piece by piece: memory bounded whatever the length. The DSP voice keeps each
            # slice's level; models hear the training loudness
            seconds = convert_file(voice, input, output, knobs, progress=update,
                                   restore_loudness=restore_loudness,
                                   target_lufs=None if model is None else TARGET_LUFS)
    _say(f"wrote {output} ({seconds:.2f} s)")


@app.command()
def devices() -> None:
    """List audio devices (index, name, channels, default rate) for --input / --output."""
    from rtsvc.live import devices_table, list_devices

    found = list_devices()
    if not found:
        _say("no audio devices found (no sound card, or PulseAudio/PipeWire not running)")
        return
    print(devices_table(found))  # plain: nothing wrapped or cut, whatever the width


@app.command()
def prepare(
    data: Path = typer.Argument(..., help="Dataset folder: DATA/SPEAKER/*.wav (flac, ogg, mp3 too); one "
                                "subfolder per speaker."),
    pretrained_dir: PretrainedDir = Path("pretrained"),
    f0: str = typer.Option("rmvpe", help="F0 extractor: rmvpe, fcpe or pyworld. Default: rmvpe."),
    workers: int = typer.Option(2, help="Files processed in parallel (threads sharing the encoders). "
                                "Default: 2."),
    device: Device = "auto", contentvec: ContentVec = None, whisper: Whisper = None, rmvpe: Rmvpe = None,
    family: str = typer.Option("v2", help="Model family the features are for: v2 (ContentVec + Whisper) or "
                               "v3 (ContentVec only, as upstream V3 prepares it; no Whisper needed). "
                               "Default: v2."),
) -> None:
    """Prepare recordings for training: 44.1 kHz, -18 LUFS, sliced, features cached (resumable)."""
    from training.prepare import CACHE_DIR, find_sources, make_feature_fn, prepare_dataset, too_little_audio

    f0 = check_f0(f0)
    find_sources(data)  # a wrong folder fails before the encoders load
    extract, settings = make_feature_fn(pretrained_dir, f0, device, contentvec, whisper,
                                        str(rmvpe) if rmvpe else None, family)
    with _progress_bar() as bar:
        task = bar.add_task("preparing", total=None)
        update = lambda done, total, name: bar.update(task, completed=done, total=total)  # noqa: E731
        result = prepare_dataset(data, extract, settings, workers=workers, on_progress=update)
    for skipped in result.skipped:
        console.print(f"[yellow]skipped[/] {skipped.path}: {skipped.reason}", highlight=False)
    _table(f"prepared {data} ({CACHE_DIR}/)", ("speaker", "files", "clips", "minutes"),
           [(name, str(i["sources"]), str(i["clips"]), f"{i['seconds'] / 60:.1f}")
            for name, i in sorted(result.speakers.items())])
    _say(f"{result.processed} file(s) processed, {result.reused} already done, {len(result.skipped)} "
         f"skipped; metadata: {result.metadata_path}")
    for warning in too_little_audio(result):
        console.print(f"[yellow]warning[/] {warning}", highlight=False)


@app.command()
def train(
    data: Path = typer.Option(..., "--data", help="Prepared dataset folder (run `rtsvc prepare` first). "
                              "Required."),
    out: Path = typer.Option(..., "--out", help="Run folder for checkpoints, metrics.jsonl and val/. "
                             "Required."),
    pretrained: Path | None = typer.Option(None, help="Checkpoint to fine-tune (upstream or rtsvc .ckpt); "
                                           "new speakers are added. Default: none, train from scratch."),
    model: str | None = typer.Option(None, help="Model size for training from scratch: dit-256-4, "
                                     "dit-384-4, dit-512-4, dit-512-8, dit-768-12, dit-1024-12, "
                                     "dit-1024-16. Default: dit-768-12 (with --pretrained: its size)."),
    max_steps: int = typer.Option(30000, help="Optimizer steps in total (a resumed run continues to it). "
                                  "Default: 30000."),
    batch_size: int = typer.Option(64, help="Clips per step per GPU. Default: 64."),
    lr: float | None = typer.Option(None, help="Learning rate. Default: 5e-5 with --pretrained, else 1e-3."),
    weight_decay: float | None = typer.Option(None, help="AdamW weight decay. Default: 0.01 with "
                                              "--pretrained, else 0."),
    grad_clip: float = typer.Option(0.0, help="Clip the global gradient norm to this (0 = off). Default: 0."),
    precision: TrainPrecision = "auto",
    save_every: int = typer.Option(1000, help="Steps between checkpoints (last.ckpt + step-N.ckpt). "
                                   "Default: 1000."),
    eval_every: int = typer.Option(1000, help="Steps between validations (0 = never). Default: 1000."),
    log_every: LogEvery = 10,
    eval_samples: int = typer.Option(2, help="Clips sampled to WAV + PNG at each validation. Default: 2."),
    num_workers: NumWorkers = 2,
    seed: TrainSeed = 2025,
    resume: Resume = False,
    device: TrainDevice = "auto",
    pretrained_dir: Path | None = typer.Option(None, help="Pretrained components for the validation "
                                               "vocoder. Default: the folder `rtsvc prepare` used."),
    vocoder: Path | None = typer.Option(None, help="NSF-HiFiGAN model.ckpt for validation audio. Default: "
                                        "PRETRAINED_DIR/nsf_hifigan_44.1k_hop512_128bin_2024.02/model.ckpt "
                                        "(none found: plots only)."),
    lora_rank: int | None = typer.Option(None, help="V3: train LoRA adapters of this rank on every "
                                         "attn.k_proj / v_proj plus the speaker table, nothing else (needs "
                                         "--lora-alpha). Default: off (all weights train)."),
    lora_alpha: float | None = typer.Option(None, help="V3: LoRA scale numerator; adapters add (x A) B^T * "
                                            "alpha / sqrt(rank). Default: none (required with --lora-rank)."),
    freeze_adaln_and_tembed: bool = typer.Option(False, help="V3: keep the time embedding and every adaptive "
                                                 "norm fixed (upstream's fine-tune option). Default: off."),
) -> None:
    """Train a RIFT-SVC V2 or V3 model on a prepared dataset (fine-tune, LoRA or from scratch; the family
    follows --pretrained, else the dataset's `prepare --family`; torchrun for DDP)."""
    from training.train import TrainConfig
    from training.train import train as run_training

    for name, value in (("--max-steps", max_steps), ("--batch-size", batch_size),
                        ("--save-every", save_every), ("--log-every", log_every)):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    result = run_training(TrainConfig(
        data=str(data), out=str(out), pretrained=str(pretrained) if pretrained else None, model=model,
        max_steps=max_steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay, grad_clip=grad_clip,
        precision=precision, save_every=save_every, eval_every=eval_every, log_every=log_every,
        eval_samples=eval_samples, num_workers=num_workers, seed=seed, resume=resume, device=device,
        pretrained_dir=str(pretrained_dir) if pretrained_dir else None,
        vocoder=str(vocoder) if vocoder else None, lora_rank=lora_rank, lora_alpha=lora_alpha,
        freeze_adaln_and_tembed=freeze_adaln_and_tembed))
    if result.rank != 0:  # torchrun: one report, from rank 0
        return
    new = set(result.new_speakers)
    console.print("speakers: " + ", ".join(f"{n}{' (new)' if n in new else ''}" for n in result.speakers),
                  highlight=False)
    if result.new_speakers:
        console.print(f"default speaker: {result.new_speakers[0]} (live, convert and serve use it without "
                      "--speaker)", highlight=False)
    state = "stopped (Ctrl-C)" if result.interrupted else "finished"
    console.print(f"{state} at step {result.global_step}; checkpoint: {result.last_checkpoint}"
                  + (" (continue with --resume)" if result.interrupted else ""), highlight=False)


@app.command()
def distill(
    teacher: Path = typer.Option(..., "--teacher", help="Teacher checkpoint (.ckpt), e.g. RUN/last.ckpt of "
                                 "`rtsvc train`. Required."),
    data: Path = typer.Option(..., "--data", help="Prepared dataset folder (`rtsvc prepare`), normally the "
                              "teacher's. Required."),
    out: Path = typer.Option(..., "--out", help="Run folder for checkpoints and metrics.jsonl; the student "
                             "is OUT/last.ckpt. Required."),
    nfe: int = typer.Option(1, help="Network evaluations per block the student is made for: 1 or 2 (both are "
                            "trained; this sets its default). Default: 1."),
    max_steps: int = typer.Option(5000, help="Optimizer steps in total (a resumed run continues to it). "
                                  "Default: 5000."),
    batch_size: int = typer.Option(16, help="Teacher trajectories per step per GPU. Default: 16."),
    pairs: int = typer.Option(4, help="Intervals trained per trajectory (the student's batch is "
                              "batch-size x pairs). Default: 4."),
    cfg_strength: float | None = typer.Option(None, help="V2 teachers: Whisper guidance strength baked into "
                                              "the student (0-10). Default: 2."),
    ds_cfg_strength: float | None = typer.Option(None, help="V3 teachers: content-degradation guidance "
                                                 "strength baked in (0-10). Default: 0.2."),
    spk_cfg_strength: float | None = typer.Option(None, help="V3 teachers: speaker guidance strength baked "
                                                  "in (0-10). Default: 0.8."),
    skip_cfg_strength: float | None = typer.Option(None, help="V3 teachers: skip-layer guidance strength "
                                                   "baked in (0-10). Default: 0 (off)."),
    cfg_skip_layers: int | None = typer.Option(None, help="V3 teachers: the block (0-based) the skip-layer "
                                               "pass bypasses. Default: none."),
    lr: float = typer.Option(1e-4, help="Learning rate. Default: 1e-4."),
    grad_clip: float = typer.Option(1.0, help="Clip the global gradient norm to this (0 = off). Default: 1."),
    precision: TrainPrecision = "auto",
    save_every: int = typer.Option(500, help="Steps between checkpoints (last.ckpt + step-N.ckpt). "
                                   "Default: 500."),
    log_every: LogEvery = 10,
    num_workers: NumWorkers = 2,
    seed: TrainSeed = 2025,
    resume: Resume = False,
    device: TrainDevice = "auto",
) -> None:
    """Distil a teacher into a 1-2 evaluation student without guidance branches (torchrun for DDP)."""
    from training.distill import DistillConfig
    from training.distill import distill as run_distill

    strengths = {"cfg_strength": cfg_strength, "ds_cfg_strength": ds_cfg_strength,
                 "spk_cfg_strength": spk_cfg_strength, "skip_cfg_strength": skip_cfg_strength}
    for name, value in strengths.items():  # the teacher's guidance, baked into the student
        if value is not None and not 0.0 <= value <= 10.0:
            raise UserError(f"--{name.replace('_', '-')} must be between 0 and 10, got {value:g}")
    result = run_distill(DistillConfig(
        teacher=str(teacher), data=str(data), out=str(out), nfe=nfe, max_steps=max_steps,
        batch_size=batch_size, pairs=pairs, **strengths,
        cfg_skip_layers=None if cfg_skip_layers is None else [cfg_skip_layers], lr=lr, grad_clip=grad_clip,
        precision=precision, save_every=save_every, log_every=log_every, num_workers=num_workers, seed=seed,
        resume=resume, device=device))
    if result.rank != 0:
        return
    state = "stopped (Ctrl-C)" if result.interrupted else "finished"
    resume_hint = " (continue with --resume)" if result.interrupted else ""
    console.print(f"{state} at step {result.global_step}; student ({result.info.nfe} evaluation(s) per "
                  f"block): {result.last_checkpoint}{resume_hint}", highlight=False)


@app.command("export")
def export_cmd(
    ckpt: Path = typer.Argument(..., help="RIFT-SVC V2 or V3 checkpoint (.ckpt; V3 LoRA adapters are merged) "
                                "to export."),
    out: Path = typer.Option(..., "--out", "-o", help="Bundle directory to write, e.g. my-voice.rtsvc "
                             "(replaced if it is already a bundle). Required."),
    pretrained_dir: Path = typer.Option(Path("pretrained"), help="Folder of pretrained components in "
                                        "the upstream layout (vocoder; encoders with --with-encoders). "
                                        "Default: pretrained/."),
    vocoder: Path | None = typer.Option(None, help="NSF-HiFiGAN model.ckpt (config.json beside it). Default: "
                                        "PRETRAINED_DIR/nsf_hifigan_44.1k_hop512_128bin_2024.02/model.ckpt."),
    opset: int = typer.Option(17, help="ONNX opset version (7-21). Default: 17."),
    fp16: bool = typer.Option(False, help="Export fp16 graphs (inputs/outputs stay fp32; for GPU "
                              "providers). Default: off (fp32)."),
    cfg_skip_layers: int = typer.Option(-1, help="V3 models: also put the skip-layer guidance pass into the "
                                        "graph, bypassing this DiT block (0-based; the bundle then honours "
                                        "--skip-cfg-strength with this block only); -1 = no skip pass. "
                                        "Default: -1."),
    with_encoders: bool = typer.Option(False, help="Also export ContentVec, the Whisper encoder (V2) and "
                                       "FCPE's network (for --f0 fcpe) to ONNX (large: ~0.4 GB + ~2.4 GB for "
                                       "the real models, FCPE 43 MB). Default: off."),
    tolerance: float | None = typer.Option(None, help="Largest allowed parity error, relative to the "
                                           "largest torch output value. Default: 1e-4 (fp32), 2e-2 (fp16)."),
    int8: bool = typer.Option(False, help="Then quantize for CPUs: dynamic int8 DiT and encoders, "
                              "calibrated static int8 vocoder (each kept fp32 where int8 is not faster "
                              "here); prints int8-vs-fp32 parity and timing. Default: off (fp32)."),
) -> None:
    """Export a checkpoint + vocoder to an ONNX Runtime bundle (.rtsvc), checked against torch."""

    from export.onnx_export import export_bundle, export_steps

    VoiceSpec(model=ckpt).validate()  # a wrong path is said before the progress bar starts
    if int8 and fp16:
        raise UserError("--int8 quantizes an fp32 export: drop --fp16")

    with _progress_bar() as bar:
        task = bar.add_task("exporting", total=export_steps(with_encoders))
        started = []

        def step(label: str) -> None:  # called as each step starts: the previous ones are done
            bar.update(task, description=label, completed=len(started))
            started.append(label)

        result = export_bundle(ckpt, out, pretrained_dir=pretrained_dir, vocoder=vocoder, opset=opset,
                               fp16=fp16, with_encoders=with_encoders, tolerance=tolerance, progress=step,
                               skip_layers=None if cfg_skip_layers < 0 else (cfg_skip_layers,))
        bar.update(task, completed=export_steps(with_encoders), description="done")
    _table("parity: ONNX Runtime (CPU) vs torch",
           ("graph", "batch", "frames", "max abs error", "max |torch|", "relative", "ok"),
           [(r.graph, str(r.batch), str(r.frames), f"{r.max_abs:.2e}", f"{r.ref_max:.3g}", f"{r.rel:.2e}",
             "yes" if r.ok else "[bold red]NO[/]") for r in result.rows])
    if not result.ok:
        worst = max(result.failures(), key=lambda r: r.rel)
        raise UserError(f"parity check failed: {worst.graph} at {worst.frames} frames differs by "
                        f"{worst.rel:.2e} (relative) > tolerance {worst.tolerance:g}; no bundle written")
    exporters = ", ".join(f"{k}: {v}" for k, v in result.exporters.items())
    console.print(f"wrote {result.path} (exporter {exporters})", highlight=False)
    if int8:
        from export.quantize import quantize_bundle

        with _progress_bar() as bar:
            task = bar.add_task("int8", total=None)
            rows = quantize_bundle(result.path, step=lambda label: bar.update(task, description=label))
        _table("int8 vs fp32 (ONNX Runtime CPU, this machine)",
               ("graph", "scheme", "relative L2", "fp32 ms", "int8 ms", "speed-up"),
               [(r.graph, r.scheme, f"{r.rel_l2:.4f}", f"{r.fp32_ms:.1f}", f"{r.int8_ms:.1f}",
                 f"{r.fp32_ms / r.int8_ms:.2f}x") for r in rows])
        console.print(f"quantized {result.path} to int8", highlight=False)


@app.command()
def bench(
    model: Path | None = typer.Option(None, "--model", "-m", help="Also benchmark this checkpoint or "
                                      ".rtsvc bundle. Default: the DSP voice only."),
    pretrained_dir: PretrainedDir = Path("pretrained"),
    block_ms: str = typer.Option(BENCH_BLOCKS, help=f"Comma-separated block lengths in ms; auto is "
                                 f"{BLOCK_AUTO}. Default: {BENCH_BLOCKS}."),
    steps: str | None = typer.Option(None, help=f"Comma-separated sampling steps (grid points) for models. "
                                     f"Default: {BENCH_STEPS}; a distilled student: its own count."),
    schedule: Schedule = KNOBS.schedule,
    backend: str = typer.Option("auto", help="Comma-separated model backends (torch, onnx, auto). "
                                "Default: auto."),
    device: str = typer.Option("all", help="Comma-separated torch devices (cpu, cuda) or all (cpu and "
                               "cuda when present). Default: all."),
    context_ms: ContextMs = STREAM.context_ms, crossfade_ms: CrossfadeMs = STREAM.crossfade_ms,
    dit_context_ms: DitContextMs = DIT_CONTEXT_MS, concurrent_f0: ConcurrentF0 = CONCURRENT_F0,
    seconds: float = typer.Option(5.0, help="Audio streamed per configuration, in seconds. Default: 5."),
    loopback: bool = typer.Option(False, help="Also measure end-to-end latency of `rtsvc live` (DSP voice "
                                  "and --model, each block length) through PulseAudio null sinks (needs "
                                  "pulseaudio): mean and p95, underruns, and the split. Default: off."),
    loopback_live: str = typer.Option("", help="--loopback: more `rtsvc live` options for every row, e.g. "
                                      "'--audio-api pulse --pipeline'. Default: none."),
    loopback_seconds: float = typer.Option(6.0, help="--loopback: seconds of bursts measured per row. "
                                           "Default: 6."),
    gap: bool = typer.Option(False, help="Also measure how close streaming is to offline (log-spectral "
                             "distance, dB) for each block length x crossfade (--crossfades) x SOLA search "
                             "(--sola-searches), for the DSP voice and --model. Default: off."),
    crossfades: str = typer.Option(GAP_CROSSFADES, help=f"--gap: comma-separated crossfades in ms. "
                                   f"Default: {GAP_CROSSFADES}."),
    sola_searches: str = typer.Option(GAP_SEARCHES, help=f"--gap: comma-separated SOLA searches in ms. "
                                      f"Default: {GAP_SEARCHES}."),
    threads: int | None = typer.Option(None, help="CPU threads for torch and for each ONNX Runtime "
                                       "session (1 = steadiest on a busy machine). Default: the "
                                       "libraries' own (every core); 1 with --streams."),
    streams: str | None = typer.Option(None, help="Instead: comma-separated counts of simulated real-time "
                                       "clients streaming through a loopback websocket server, each count "
                                       "run with every --max-batches value; reports latency, late blocks "
                                       "and the largest count held in real time. Default: off."),
    max_batches: str = typer.Option(STREAMS_BATCHES, help="--streams: comma-separated --max-batch values to "
                                    f"compare (1 = unbatched). Default: {STREAMS_BATCHES}."),
    batch_deadline_ms: BatchDeadlineMs = SERVER.batch_deadline_ms,
    batch_runners: BatchRunners = SERVER.batch_runners,
    f0: F0 = None, precision: Precision = "fp32", providers: Providers = None, contentvec: ContentVec = None,
    whisper: Whisper = None, vocoder: Vocoder = None, rmvpe: Rmvpe = None,
) -> None:
    """Per-block compute time (mean/p50/p99), real-time factor, latency and per-stage breakdown."""
    from rtsvc.bench import blocks as lib
    from rtsvc.bench.loopback import loopback_report

    if streams is not None:  # the streams bench instead of the per-block tables
        from rtsvc.bench.streams import run_streams_command

        spec = VoiceSpec(model=model, pretrained_dir=pretrained_dir, contentvec=contentvec, whisper=whisper,
                         vocoder=vocoder, rmvpe=rmvpe, f0=f0, precision=precision, providers=providers,
                         backend=backend, device="auto" if device == "all" else device,
                         dit_context_ms=dit_context_ms, threads=threads or STREAMS_THREADS)
        run_streams_command(spec, streams, max_batches, "auto" if block_ms == BENCH_BLOCKS else block_ms,
                            None if steps == BENCH_STEPS else steps, context_ms, crossfade_ms, seconds,
                            batch_deadline_ms, threads or STREAMS_THREADS,
                            Console(width=None if sys.stdout.isatty() else 150), batch_runners=batch_runners)
        return

    configs = [StreamConfig(block_ms=b, context_ms=context_ms, crossfade_ms=crossfade_ms).validate()
               for b in lib.parse_blocks(block_ms)]
    grid = lib.gap_grid(configs, lib.parse_list(crossfades, float, "--crossfades"),
                        lib.parse_list(sola_searches, float, "--sola-searches")) if gap else []
    devices_, backends = lib.bench_devices(device), backend.split(",")
    spec = VoiceSpec(model=model, pretrained_dir=pretrained_dir, contentvec=contentvec, whisper=whisper,
                     vocoder=vocoder, rmvpe=rmvpe, f0=f0, precision=precision, providers=providers,
                     dit_context_ms=dit_context_ms, threads=threads)
    counts = lib.parse_list(steps, int, "--steps") if steps is not None else []
    cases = lib.make_cases(configs, spec, counts, backends, devices_, lib.parse_list(BENCH_STEPS, int, ""),
                           schedule)
    wide = Console(width=None if sys.stdout.isatty() else 150)  # tables are not squeezed in logs
    lib.run_bench(cases, seconds, console=wide)
    if gap:  # a model's gap on the first device and backend
        lib.run_gap(grid, spec.with_(backend=backends[0], device=devices_[0]), console=wide)
    if loopback:
        import shlex

        from rtsvc.bench.loopback import LOOPBACK_COLUMNS

        extra = shlex.split(loopback_live)
        runs = [(c, extra) for c in lib.dsp_configs(configs)]
        if model is not None:  # the model at each block as given (auto: live measures it)
            model_args = ["--model", str(model), "--pretrained-dir", str(pretrained_dir)]
            model_args += ["--f0", f0] if f0 else []
            model_args += ["--providers", providers] if providers else []
            runs += [(c, model_args + extra) for c in configs]
        rows = []
        for config, args in runs:
            block = "auto" if config.block_ms is None else f"{config.block_ms:g} ms"
            _say(f"loopback: PulseAudio and `rtsvc live {' '.join(args)}` (block {block})")
            rows.append(loopback_report(config, args, seconds=loopback_seconds))
        _table("end-to-end latency of `rtsvc live` through PulseAudio null sinks (ms, rig delay subtracted)",
               LOOPBACK_COLUMNS, rows)


@app.command()
def download(
    to: Path = typer.Option(Path("pretrained"), help="Folder to fill in the upstream layout. "
                            "Default: pretrained/."),
    voice: list[str] | None = typer.Option(None, help="Pretrained voice checkpoint to fetch too "
                                           "(repeatable): pretrain-v2, pretrain-v3-512-8, "
                                           "pretrain-v3-768-12, pretrain-v3-1024-16, or none. "
                                           "Default: pretrain-v2."),
    family: str = typer.Option("all", help="Components for which models: v2 (ContentVec, Whisper, vocoder, "
                               "RMVPE), v3 (the same without Whisper, ~3 GB less) or all. Default: all."),
) -> None:
    """Fetch ContentVec, Whisper large-v3 (V2 models), NSF-HiFiGAN, RMVPE and pretrained voice checkpoints."""
    from rtsvc.pretrained import DEFAULT_VOICES, components_for, download_pretrained

    voices = tuple(v for v in (voice or DEFAULT_VOICES) if v != "none")

    def step(i: int, total: int, item) -> None:  # huggingface_hub draws each file's progress bar
        _say(f"[{i + 1}/{total}] {item.label}: {item.describe()} -> {item.local_dir}")

    path = download_pretrained(to, components_for(family), voices=voices, on_step=step)
    _say(f"pretrained components are in {path}")


@app.command()
def doctor(
    pretrained_dir: Path = typer.Option(Path("pretrained"), help="Folder of pretrained components to "
                                        "look into. Default: pretrained/."),
) -> None:
    """Show versions, torch devices, working ONNX Runtime providers, audio devices, found components."""
    from rtsvc.doctor import doctor_report, render_report

    Console().print(render_report(doctor_report(pretrained_dir)))


def main() -> None:
    # pyworld 0.3.5 imports pkg_resources; its deprecation warning is noise for users
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
    command = typer.main.get_command(app)
    for sub in command.commands.values():  # every help text says its default once, in its own words
        for param in sub.params:
            param.show_default = False
            if isinstance(param, typer.core.TyperArgument):  # usage says INPUT, not typer's {input}
                param._usage_display_name = lambda name=param.name.upper(): name
    try:
        command(prog_name="rtsvc")
    except UserError as err:
        # one line whatever the terminal width, and no markup parsing of the message
        console.print(Text.assemble(("error: ", "bold red"), str(err)), soft_wrap=True, highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
