"""The `rtsvc` command's options: the knob options made from rtsvc.settings.KNOB_TABLE, the other
options with their help and panels, help that fits any terminal width, and output helpers.

Defaults and the "Default: ..." in help come from the library (`KNOB_TABLE`, `StreamConfig`,
`ServerConfig`), so a default changed there shows up here.
"""

import functools
import inspect
import sys
import warnings
from collections.abc import Collection, Iterable
from dataclasses import fields
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.text import Text
from rtsvc.training.config import DistillConfig, TrainConfig

from rtsvc.autoblock import P99_MARGIN
from rtsvc.backends.providers import PROVIDER_CHOICES
from rtsvc.dsp.slicer import FADE_MS
from rtsvc.engine import StreamConfig
from rtsvc.errors import UserError
from rtsvc.eval.configs import help_text as eval_config_help
from rtsvc.features.f0_methods import DEFAULT_F0, MODEL_F0
from rtsvc.live import AUDIO_API, DEVICE_BLOCK_MS, PULSE_BUFFER_MS, PULSE_DEVICE_BLOCK_MS
from rtsvc.serve.server import ServerConfig
from rtsvc.settings import KNOB_TABLE, Knob, KnobError, knobs_class, validate_knobs
from rtsvc.voices.defaults import (
    DIT_CONTEXT_MS,
    DSP_STREAM,
    ENCODER_CONTEXT_MS,
    MAX_VOCODER_CONTEXT_FRAMES,
    MIN_ENCODER_CONTEXT_MS,
    MODEL_STREAM,
    VOCODER_CONTEXT_FRAMES,
)
from rtsvc.voices.spec import CONCURRENT_F0

STREAM, SERVER = StreamConfig(), ServerConfig()
# help panels, in the order --help shows them
DEVICE, VOICE, MODEL, STREAMING, SERVING, TRAINING, ADVANCED = (
    "Device", "Voice", "Model", "Streaming", "Server", "Training", "Advanced")
PANELS = (DEVICE, VOICE, MODEL, STREAMING, SERVING, TRAINING, ADVANCED)


def opt(kind: type, help: str, *names: str, panel: str | None = None):
    """A shared option: `name: Alias = default` in each command (typer.Option inside Annotated)."""
    return Annotated[kind, typer.Option(*names, help=help, rich_help_panel=panel)]


# --- knobs: one option per row of KNOB_TABLE ----------------------------------------------------


def knob_options(skip: Collection[str] = (), defaults: dict | None = None,
                 table: Iterable[Knob] = KNOB_TABLE, aliases: dict[str, tuple[str, ...]] | None = None):
    """Decorator: adds one option per knob row (its flags and help; basic knobs in the Voice panel,
    the rest in Advanced) to a typer command, which instead receives `knobs` (validated `Knobs`:
    what was typed, else `defaults`, else the row's default) and `typed` (the knob values typed).
    A bad value is a UserError naming the flag typed (`--pitch must be ...`). `aliases` adds option
    names to a knob for this command (convert takes upstream's `--key-shift`)."""
    defaults, table, aliases = dict(defaults or {}), tuple(table), dict(aliases or {})
    rows = [k for k in table if k.flags and k.name not in skip]
    make_knobs = knobs_class(table)  # `Knobs` itself for KNOB_TABLE

    def decorate(func):
        own = [p for name, p in inspect.signature(func).parameters.items() if name not in ("knobs", "typed")]
        added = [inspect.Parameter(
            k.name, inspect.Parameter.KEYWORD_ONLY, default=None,
            annotation=Annotated[(str if k.words else k.kind) | None, typer.Option(  # words: typed as text
                *k.flags, *aliases.get(k.name, ()), help=k.cli_help(defaults.get(k.name)),
                rich_help_panel=VOICE if k.basic else ADVANCED)],
        ) for k in rows]

        @functools.wraps(func)
        def command(*args, **kwargs):
            typed = {k.name: kwargs.pop(k.name) for k in rows}
            typed = {name: value for name, value in typed.items() if value is not None}
            try:
                typed = with_words(typed, rows)
                knobs = validate_knobs(make_knobs(**{**defaults, **typed}), table)
            except KnobError as err:
                raise UserError(err.for_flag()) from None
            return func(*args, knobs=knobs, typed=typed, **kwargs)

        command.__signature__ = inspect.Signature(own + added)  # what typer reads
        command.__annotations__ = {p.name: p.annotation for p in own + added}
        del command.__wrapped__
        return command

    return decorate


def with_words(typed: dict, rows: Iterable[Knob]) -> dict:
    """`typed` with a row's words (`--pitch auto`) replaced by the knob value they stand for, and the
    row's other text as its number (KnobError when it is neither)."""
    for k in rows:
        if k.words and k.name in typed:
            value, meaning = typed.pop(k.name), {word: (name, v) for word, name, v in k.words}
            if value in meaning:
                typed[meaning[value][0]] = meaning[value][1]
            else:
                try:
                    typed[k.name] = k.coerce(value, text=True)
                except KnobError as err:
                    words = " or ".join(repr(w) for w, _, _ in k.words)
                    raise KnobError(k, f"{err.problem.split(',')[0]} or {words}, got {value!r}") from None
    return typed


# --- options shared by several commands ---------------------------------------------------------

# train and distill
TRAIN, DISTILL = TrainConfig(data="", out=""), DistillConfig(teacher="", data="", out="")  # the defaults
TrainPrecision = opt(str | None, "auto, fp32, bf16 or fp16 (autocast). Default: "
                     f"{TRAIN.precision} (bf16 on a CUDA GPU that has it, else fp32).", panel=TRAINING)
LogEvery = opt(int | None, f"Steps between metrics.jsonl lines. Default: {TRAIN.log_every}.", panel=TRAINING)
NumWorkers = opt(int | None, f"DataLoader worker processes. Default: {TRAIN.num_workers}.", panel=TRAINING)
TrainSeed = opt(int | None, f"Random seed (batches, crops, noise). Default: {TRAIN.seed}.", panel=TRAINING)
Resume = opt(bool, "Continue OUT/last.ckpt at its exact step. Default: off.", panel=TRAINING)
TrainDevice = opt(str | None, f"Torch device: auto, cpu or cuda. Default: {TRAIN.device} (under torchrun: "
                  "one GPU per rank).")

Model = opt(Path | None, "RIFT-SVC V2 or V3 checkpoint (.ckpt, LoRA fine-tunes too), shared .safetensors "
            "voice (read without pickle) or exported .rtsvc bundle. Default: none, the built-in DSP voice.",
            "--model", "-m", panel=MODEL)
PretrainedDir = opt(Path, "Folder of pretrained components in the upstream layout. Default: pretrained/.",
                    panel=MODEL)
ContentVec = opt(str | None, "ContentVec folder or hub id. Default: PRETRAINED_DIR/content-vec-best.",
                 panel=MODEL)
Whisper = opt(str | None, "Whisper folder or hub id (V2 models only). Default: "
              "PRETRAINED_DIR/whisper-large-v3.", panel=MODEL)
Vocoder = opt(Path | None, "NSF-HiFiGAN model.ckpt (config.json beside it). Default: PRETRAINED_DIR/"
              "nsf_hifigan_44.1k_hop512_128bin_2024.02/model.ckpt (a .rtsvc bundle has its own).",
              panel=MODEL)
Rmvpe = opt(Path | None, "RMVPE model.pt. Default: PRETRAINED_DIR/rmvpe/model.pt.", panel=MODEL)
F0 = opt(str | None, f"F0 extractor for models: {', '.join(MODEL_F0)} (the DSP voice always uses "
         f"pyworld). Default: {DEFAULT_F0}.", panel=MODEL)
Device = opt(str, "Torch device: auto, cpu or cuda. Default: auto (CUDA if present).", panel=MODEL)
Backend = opt(str, "Model backend: auto, torch or onnx. Default: auto (onnx for .rtsvc bundles, torch "
              "for .ckpt).", panel=MODEL)
Precision = opt(str, "Torch compute precision on CUDA: fp32, fp16 or bf16 (CPU always fp32). Default: fp32.",
                panel=MODEL)
Providers = opt(str | None, "ONNX Runtime providers for .rtsvc bundles, in order, e.g. cuda,cpu ("
                f"{', '.join(PROVIDER_CHOICES)}; `rtsvc doctor` shows which start here). Default: automatic "
                "(each of TensorRT, CUDA, MIGraphX, ROCm, DirectML, CoreML that starts here, then CPU).",
                panel=MODEL)
Schedule = opt(str, next(k for k in KNOB_TABLE if k.name == "schedule").cli_help(), panel=ADVANCED)

BLOCK_AUTO = ("auto = measured at start on this machine: the shortest block whose p99 compute is at most "
              f"{P99_MARGIN:g} of it, searched from {DSP_STREAM.block_ms:g} ms for the DSP voice, "
              f"{MODEL_STREAM.block_ms:g} ms (150.9 ms) with --model")
BlockMs = Annotated[str, typer.Option(metavar="MS|auto", rich_help_panel=STREAMING, help="Engine block "
                                      "length in ms, or auto (latency and compute per block; rounded to "
                                      f"11.6 ms mel frames). Default: {BLOCK_AUTO}.")]
DitContextMs = opt(float, "Left context in ms the model's DiT samples before the frames it outputs while "
                   "streaming (>= 0; longer than --context-ms = the whole window; longer costs more DiT "
                   f"time). Models only. Default: {DIT_CONTEXT_MS:g}.", panel=STREAMING)
EncoderContextMs = opt(float | None, "Left context in ms ContentVec (and Whisper) see before each block's "
                       f"new audio while streaming (>= {MIN_ENCODER_CONTEXT_MS:g}; older frames come from a "
                       "cache; bounded by the window, --context-ms + the block's tail: ~335 ms at the "
                       "defaults; shorter costs less and differs more from offline). Models only. Default: "
                       f"{ENCODER_CONTEXT_MS:g}.", panel=STREAMING)
VocoderContext = opt(int | None, "Mel frames (11.6 ms) the vocoder runs on before each block's output while "
                     f"streaming (0-{MAX_VOCODER_CONTEXT_FRAMES}; fewer costs less, 12 equals vocoding the "
                     f"whole window). Models only. Default: {VOCODER_CONTEXT_FRAMES}.", panel=STREAMING)
PitchReference = opt(Path, "Model voices, --pitch auto: a folder of recordings of the target voice whose "
                     "median F0 is the target (for models without pitch statistics, e.g. upstream "
                     "checkpoints; overrides the model's). Default: the model's own statistics.",
                     "--pitch-reference", panel=VOICE)
ContextMs = opt(float, f"Left context per block in ms. Default: {STREAM.context_ms:g}.", panel=STREAMING)
CrossfadeMs = opt(float | None, f"SOLA crossfade in ms. Default: {DSP_STREAM.crossfade_ms:g} for the DSP "
                  f"voice, {MODEL_STREAM.crossfade_ms:g} with --model.", panel=STREAMING)
SolaSearchMs = opt(float | None, f"SOLA search window in ms. Default: {DSP_STREAM.sola_search_ms:g} for the "
                   f"DSP voice, {MODEL_STREAM.sola_search_ms:g} with --model.", panel=STREAMING)
MaxBatch = opt(int, "Model voices: most clients' blocks run as one batch through every model stage (F0, "
               f"encoders, DiT, vocoder; 1 = each block alone). Default: {SERVER.max_batch}.", panel=SERVING)
BatchRunners = opt(int, "With --max-batch > 1: threads that run batches (a spare one starts only when a "
                   "block would otherwise be late; fewer did better on a machine busy with other "
                   f"work). Default: {SERVER.batch_runners} (one per CPU core, at most 8).", panel=SERVING)
BatchDeadlineMs = opt(float, "Longest a block waits in ms for other clients' blocks that are expected soon "
                      "(never past its real-time budget of one block). Default: "
                      f"{SERVER.batch_deadline_ms:g}.",
                      panel=SERVING)
ConcurrentF0 = opt(bool, "Model voices while streaming: extract F0 on a second thread while ContentVec runs "
                   "(same output; faster where a core is free; a bundle's encoders then take one thread "
                   f"unless --threads is given). Default: {'on' if CONCURRENT_F0 else 'off'}.",
                   "--concurrent-f0/--no-concurrent-f0", panel=STREAMING)
Threads = opt(int | None, "CPU threads for torch and for each ONNX Runtime session. Default: torch 1 while "
              "streaming on a CPU (steadiest on a busy machine), ONNX Runtime its own (every core).",
              panel=MODEL)


# --- output and helpers that commands share -------------------------------------------------------

console = Console(stderr=True)


def say(text: str) -> None:
    console.print(text, highlight=False, soft_wrap=True, markup=False)  # paths may hold "[/"


def pick(cls: type, options: dict, **fixed):
    """`cls` (VoiceSpec, ServerConfig, TrainConfig...) from the fields among a command's options (its
    locals()): an option left None takes the dataclass's default, so defaults live there; then `fixed`."""
    names = {f.name for f in fields(cls)}
    return cls(**{**{k: v for k, v in options.items() if k in names and v is not None}, **fixed})


def progress_bar(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=False)


def step_counter(bar, task):
    """A progress callback called as each step starts (the previous ones are then done)."""
    started = []

    def step(label: str) -> None:
        bar.update(task, description=label, completed=len(started))
        started.append(label)

    return step


def print_table(title: str, columns: tuple[str, ...], rows) -> None:
    """Print a table on stdout: the first column left-aligned, numbers right-aligned. Text is shown
    literally (names and paths may hold rich markup such as "[/"); style a cell with a `Text`."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(title))
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(cell if isinstance(cell, Text) else Text(cell) for cell in row))
    Console().print(table)


def report_prepared(result, data: Path, cache_dir: str, warnings: list[str]) -> None:
    """What `rtsvc prepare` did: skipped files, a table per speaker, totals and warnings."""
    from rich.text import Text

    for skipped in result.skipped:
        console.print(Text.assemble(("skipped", "yellow"), f" {skipped.path}: {skipped.reason}"),
                      highlight=False)
    print_table(f"prepared {data} ({cache_dir}/)", ("speaker", "files", "clips", "minutes"),
                [(name, str(i["sources"]), str(i["clips"]), f"{i['seconds'] / 60:.1f}")
                 for name, i in sorted(result.speakers.items())])
    say(f"{result.processed} file(s) processed, {result.reused} already done, {len(result.skipped)} "
        f"skipped; metadata: {result.metadata_path}")
    for warning in warnings:
        console.print(Text.assemble(("warning", "yellow"), f" {warning}"), highlight=False)


def _stopped(result) -> str:
    return "stopped (Ctrl-C)" if result.interrupted else "finished"


def report_trained(result) -> None:
    """What `rtsvc train` did (rank 0 only under torchrun)."""
    if result.rank != 0:
        return
    new = set(result.new_speakers)
    say("speakers: " + ", ".join(f"{n}{' (new)' if n in new else ''}" for n in result.speakers))
    if result.new_speakers:
        say(f"default speaker: {result.new_speakers[0]} (live, convert and serve use it without --speaker)")
    say(f"{_stopped(result)} at step {result.global_step}; checkpoint: {result.last_checkpoint}"
        + (" (continue with --resume)" if result.interrupted else ""))


def report_distilled(result) -> None:
    """What `rtsvc distill` did (rank 0 only under torchrun)."""
    if result.rank != 0:
        return
    resume_hint = " (continue with --resume)" if result.interrupted else ""
    say(f"{_stopped(result)} at step {result.global_step}; student ({result.info.nfe} evaluation(s) per "
        f"block): {result.last_checkpoint}{resume_hint}")


def report_parity(result) -> None:
    """`rtsvc export`'s parity table; a failed check is a UserError (no bundle was written)."""
    from rich.text import Text

    print_table("parity: ONNX Runtime (CPU) vs torch",
                ("graph", "batch", "frames", "max abs error", "max |torch|", "relative", "ok"),
                [(r.graph, str(r.batch), str(r.frames), f"{r.max_abs:.2e}", f"{r.ref_max:.3g}",
                  f"{r.rel:.2e}", "yes" if r.ok else Text("NO", style="bold red")) for r in result.rows])
    if not result.ok:
        worst = max(result.failures(), key=lambda r: r.rel)
        raise UserError(f"parity check failed: {worst.graph} at {worst.frames} frames differs by "
                        f"{worst.rel:.2e} (relative) > tolerance {worst.tolerance:g}; no bundle written")
    say(f"wrote {result.path} (exporter {', '.join(f'{k}: {v}' for k, v in result.exporters.items())})")


def quantize_with_progress(path: Path) -> list:
    """`rtsvc export --int8`: quantize the bundle at `path` under a progress line; its rows."""
    from rtsvc.export.quantize import quantize_bundle

    with progress_bar(console) as bar:
        task = bar.add_task("int8", total=None)
        return quantize_bundle(path, step=lambda label: bar.update(task, description=label))


def report_int8(path: Path, rows) -> None:
    print_table("int8 vs fp32 (ONNX Runtime CPU, this machine)",
                ("graph", "scheme", "relative L2", "fp32 ms", "int8 ms", "speed-up"),
                [(r.graph, r.scheme, f"{r.rel_l2:.4f}", f"{r.fp32_ms:.1f}", f"{r.int8_ms:.1f}",
                  f"{r.fp32_ms / r.int8_ms:.2f}x") for r in rows])
    say(f"quantized {path} to int8")


def int8_maker(out: Path):
    """eval's `int8` flag: a function quantizing a bundle's copy under OUT/int8 (rtsvc may not import
    export: the command lends it)."""
    def int8_bundle(bundle: Path) -> Path:
        from rtsvc.export.quantize import int8_copy

        say(f"quantizing a copy of {bundle} to int8 under {out / 'int8'}")
        return int8_copy(bundle, out / "int8")
    return int8_bundle


def say_serving(host: str, name: str):
    """serve's on_ready: the line that says where it serves."""
    def ready(server) -> None:
        where = f"{host}:{server.port}"
        say(f"rtsvc serving {name} voice on http://{where}/ (page, /healthz) and "
            f"ws://{where}/v1/stream; Ctrl-C or SIGTERM stops")
    return ready


# --- help that fits the terminal ------------------------------------------------------------------


def _format_options(self: click.Command, ctx: click.Context, formatter: click.HelpFormatter) -> None:
    """Arguments, then one section per help panel. Option names go on their own line when long and
    help text wraps (click's definition lists), so nothing is cut at any width."""
    sections: dict[str, list] = {}
    for param in self.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None:
            continue
        if isinstance(param, click.Argument):
            panel = "Arguments"
        else:
            panel = getattr(param, "rich_help_panel", None) or "Options"
        sections.setdefault(panel, []).append(record)
    order = ["Arguments", "Options", *PANELS]  # required and command-own options before the panels
    for panel in sorted(sections, key=lambda p: order.index(p) if p in order else len(order)):
        with formatter.section(panel):
            formatter.write_dl(sections[panel], col_max=26)


def tidy_command(command: click.Command) -> None:
    """Help as rtsvc prints it: each option says its default once, in its own words; usage says
    INPUT (not typer's {input}); the command list shows each command's first sentence whole."""
    for param in command.params:
        param.show_default = False
        if isinstance(param, typer.core.TyperArgument):
            param._usage_display_name = lambda name=param.name.upper(): name
            param.help = param.help and param.help.rstrip()
    first = (command.help or "").strip().split("\n\n")[0].replace("\n", " ")
    command.short_help = first
    command.format_options = _format_options.__get__(command)
    command.context_settings.setdefault("max_content_width", 100)


# --- options of one command -----------------------------------------------------------------------

# live
Input = opt(str | None, "Input device: index or (part of) its name, PulseAudio/PipeWire sources by name; see "
            "`rtsvc devices`. Default: the system default input.", "--input", "-i", panel=DEVICE)
Output = opt(str | None, "Output device (or virtual cable): index or (part of) its name. Default: the system "
             "default output.", "--output", "-o", panel=DEVICE)
Monitor = opt(str | None, "Also play the converted voice on this device (e.g. headphones while --output is a "
              "virtual cable), at the output rate. Default: none.", panel=DEVICE)
VirtualMicName = opt(str | None, "Linux (PulseAudio/PipeWire): play the converted voice into a new "
                     "virtual microphone of this name (instead of --output) for Discord, OBS or a browser to "
                     "pick; removed on exit (a killed run's is cleaned at the next start). Default: none.",
                     "--virtual-mic", panel=DEVICE)
InputRate = opt(int | None, "Input device rate in Hz. Default: the device's.", panel=DEVICE)
OutputRate = opt(int | None, "Output device rate in Hz. Default: the device's.", panel=DEVICE)
JitterMs = opt(str, "Output buffer primed with this much silence (ms) to absorb block-to-block changes in "
               "compute time; auto = with --block-ms auto, the picked block's measured headroom (block "
               "minus mean compute, at least the voice's floor), else that floor: "
               f"{DSP_STREAM.jitter_ms:g} for the DSP voice, {MODEL_STREAM.jitter_ms:g} with --model. "
               "Default: auto.", panel=STREAMING)
Duration = opt(float | None, "Stop after this many seconds and exit 0. Default: run until Ctrl-C, SIGTERM or "
               "q.")
Record = opt(Path | None, "Also write the converted output to this audio file (output device rate). "
             "Default: none.")

# serve
Host = opt(str, f"Address to listen on; anything but loopback needs --token. Default: {SERVER.host}.",
           panel=SERVING)
Port = opt(int, f"TCP port for the websocket, /healthz and the page. Default: {SERVER.port}.", panel=SERVING)
Token = Annotated[str | None, typer.Option(
    envvar="RTSVC_TOKEN", rich_help_panel=SERVING, help="Shared secret clients must send (start message or "
    "?token=), at least 8 characters. Default: none (loopback only). Also read from $RTSVC_TOKEN.")]
MaxClients = opt(int, "Most simultaneous streams; more are refused with close code 1013. Default: "
                 f"{SERVER.max_clients}.", panel=SERVING)
MaxFrameBytes = opt(int, f"Largest binary frame in bytes (close code 1009 above it). Default: "
                    f"{SERVER.max_frame_bytes} ({SERVER.max_frame_bytes / 2**20:g} MiB).", panel=SERVING)
IdleTimeout = opt(float, "Seconds without any message before a client is closed (code 1008). Default: "
                  f"{SERVER.idle_timeout_s:g}.", panel=SERVING)
AllowedOrigin = opt(list[str] | None, "Extra browser origin allowed to connect (repeatable; '*' allows any). "
                    "The page's own origin and non-browser clients are always allowed. Default: none.",
                    panel=SERVING)
Workers = opt(int, f"Inference threads shared by all clients. Default: {SERVER.workers} (one per CPU core, "
              "at most 8).", panel=SERVING)
MaxLagMs = opt(float, "Live input not converted this many milliseconds after it was due is answered with "
               f"silence, so latency stays bounded under overload. Default: {SERVER.max_lag_ms:g}.",
               panel=SERVING)
SendTimeout = opt(float, "Seconds a client may leave its replies unread before it is dropped (code 1008). "
                  f"Default: {SERVER.send_timeout_s:g}.", panel=SERVING)
Ray = Annotated[str | None, typer.Option(
    metavar="ADDRESS|auto", rich_help_panel=SERVING, help="Deploy as a Ray Serve application (needs the ray "
    "extra of rtsvc) on the cluster at ADDRESS, or auto ($RAY_ADDRESS, else a private local instance stopped "
    "with the command). Default: off (one process).")]
Replicas = opt(int, "--ray: replicas, each holding the voice and its clients. Default: 2.", panel=SERVING)
ReplicaCpus = opt(float, "--ray: CPUs Ray reserves per replica. Default: 0.", panel=SERVING)
ReplicaGpus = opt(float, "--ray: GPUs per replica (e.g. 1, or 0.5 to share one). Default: 0.", panel=SERVING)

AudioApi = opt(str, "How to reach the sound devices: portaudio (any device), pulse (PulseAudio/PipeWire "
               "sources and sinks through libpulse, explicit buffer sizes; needs pasimple), or auto: pulse "
               "when every device is on a running PulseAudio/PipeWire server and pasimple loads, else "
               f"portaudio (the start line says which). Default: {AUDIO_API}.", panel=DEVICE)
DeviceBufferMs = opt(str, "Device buffering asked for per stream in ms: PortAudio's suggested latency, or "
                     "the pulse playback buffer; low = PortAudio's low default (pulse: "
                     f"{PULSE_BUFFER_MS:g} ms). Default: low.", panel=DEVICE)
DeviceBlockMs = opt(float | None, "Device callback size in ms; 0 = the host API's own (PortAudio only). "
                    f"Default: {DEVICE_BLOCK_MS:g} (pulse: {PULSE_DEVICE_BLOCK_MS:g}; a JACK server, e.g. "
                    "PipeWire's: 0, its period).", panel=DEVICE)
Pipeline = opt(bool, "Models: extract block n+1's features while block n's DiT and vocoder run (two threads; "
               "same output; --block-ms auto then needs only the slower half to fit). Default: off.",
               panel=STREAMING)

# convert
InputFile = Annotated[Path, typer.Argument(help="Input audio file (wav, flac, ogg, mp3; any rate; mixed to "
                                           "mono).")]
OutputFile = Annotated[Path, typer.Argument(help="Output file, 44.1 kHz mono; format from the extension "
                                            "(.wav, .flac, .ogg).")]
RestoreLoudness = opt(str | None, "Give each slice back its input loudness (true) or keep the model's "
                      "--target-loudness (false), as upstream's --restore-loudness. Default: true (V3), "
                      "false for V2 models (the V2 release's infer.py).")
TargetLoudness = opt(float, "Loudness (LUFS) each slice is brought to before conversion, as upstream. "
                     "Default: -18.")
FadeDuration = opt(float, f"Fade at each slice boundary in ms (upstream's join: half-Hann in, linear out). "
                   f"Default: {FADE_MS:g}.")
Join = opt(str, "How slices are joined: fades (upstream's, no overlap) or crossfade (ours: slices overlap "
           "by --fade-duration and crossfade). Default: fades.")
UseFp16 = opt(bool, "Upstream's name for --precision fp16 (CUDA only; a CPU keeps fp32). Default: off "
              "(fp32; upstream's infer.py defaults to fp16 on CUDA).", panel=MODEL)
CvecDownsampleRate = opt(int, "V3 models, offline: how coarsely content-degradation guidance blurs "
                         "ContentVec (every 2nd frame resized to 1/rate and back), as upstream. Default: 2.",
                         panel=ADVANCED)
BatchSize = opt(int, "Models, offline: slices converted per padded DiT batch, as upstream's (each as it "
                "would be alone; a checkpoint on torch). Default: 1.", panel=ADVANCED)
RobustF0 = opt(int, "Upstream's robust F0 for models: 0 off, 1 fill RMVPE's unvoiced frames where WORLD or "
               "Praat hear pitch, 2 median of the three with outliers replaced (needs praat-parselmouth; "
               "offline only). Default: 0.", panel=MODEL)
UPSTREAM_ALIASES = {"pitch_shift": ("--key-shift",), "steps": ("--infer-steps",)}  # upstream infer.py's names
Stream = opt(bool, "Convert through the streaming engine block by block (what live/serve hear) instead of "
             "offline slices. Default: off.", panel=STREAMING)

# eval
EVAL_HELP = ("Compare configurations on your own clips: speaker similarity, F0 accuracy, DNSMOS, distance to "
             "a reference, RTF and latency (table, OUT/eval.json, OUT/eval.png).\n\n"
             "Limits of the metrics: the speaker encoder (Resemblyzer) and DNSMOS were trained on speech, "
             "not singing nor converted voices, so on singing they are weaker and on any voice they are a "
             "guide, not a listening test; F0 error uses one tracker for input and output, whose own "
             "mistakes count; LSD and mel L1 measure distance to the reference configuration, not to a "
             "ground truth; RTF is measured on this machine as it is (a busy machine inflates it).")
EvalClips = opt(Path, "Folder of input clips (wav, flac, ogg, mp3; searched recursively); each is converted "
                "with every --config. Required.", "--clips")
EvalConfigs = Annotated[list[str] | None, typer.Option(
    "--config", "-c", metavar="MODE[:KEY=VALUE,...]", help="A configuration to convert with (repeatable), "
    "e.g. offline:steps=32, live:block=150.9, live:block=104.5,int8, live:f0=fcpe,denoise=rnnoise, "
    f"offline:model=student.ckpt. {eval_config_help()} Default: offline:steps=32 and live (the defaults).")]
EvalReference = opt(str | None, "The configuration (label or text) the others are compared with. Default: "
                    "the offline 32-step one, added when no --config is it.")
EvalSpeaker = opt(str | None, "Target speaker name. Default: the model's default (first) speaker.",
                  "--speaker")
SpeakerClips = opt(Path | None, "Recordings of the target speaker, for speaker similarity. Default: the "
                   "training clips the checkpoint records (DATA/SPEAKER), when they are still there.")
EvalPitch = opt(float, "Pitch shift in semitones for every configuration. Default: 0.", "--pitch")
EvalOut = opt(Path, "Folder for eval.json, eval.png and the converted audio (audio/). Default: eval-out/.",
              "--out", "-o")
F0Tracker = opt(str, "F0 extractor that scores every output against its input (rmvpe, fcpe or pyworld). "
                "Default: pyworld (WORLD harvest).")
Similarity = opt(bool, "Score speaker similarity (Resemblyzer). Default: on.")
Dnsmos = opt(bool, "Score quality with DNSMOS (speechmos). Default: on.")
MaxSeconds = opt(float | None, "Cut each clip to this many seconds. Default: whole clips.")
EvalSeed = opt(int, "Sampler noise seed. Default: 0.", "--seed")

# prepare
Data = Annotated[Path, typer.Argument(help="Dataset folder: DATA/SPEAKER/*.wav (flac, ogg, mp3 too); one "
                                      "subfolder per speaker.")]
PrepareF0 = opt(str, f"F0 extractor: {', '.join(MODEL_F0)}. Default: {DEFAULT_F0}.", "--f0", panel=MODEL)
PrepareWorkers = opt(int, "Files processed in parallel (threads sharing the encoders). Default: 2.",
                     "--workers")
Family = opt(str, "Model family the features are for: v2 (ContentVec + Whisper) or v3 (ContentVec only, as "
             "upstream V3 prepares it; no Whisper needed). Default: v2.", "--family")

# train
TrainData = opt(Path, "Prepared dataset folder (run `rtsvc prepare` first). Required.", "--data")
TrainOut = opt(Path, "Run folder for checkpoints, metrics.jsonl and val/. Required.", "--out")
Pretrained = opt(Path | None, "Checkpoint to fine-tune (upstream or rtsvc .ckpt); new speakers are added. "
                 "Default: none, train from scratch.")
ModelSize = opt(str | None, "Model size for training from scratch: dit-256-4, dit-384-4, dit-512-4, "
                "dit-512-8, dit-768-12, dit-1024-12, dit-1024-16. Default: dit-768-12 (with --pretrained: "
                "its size).", "--model")
def MaxSteps(default: int):  # noqa: N802 (an option type, like the aliases)
    return opt(int | None, f"Optimizer steps in total (a resumed run continues to it). Default: {default}.",
               panel=TRAINING)


def GradClip(default: float):  # noqa: N802
    return opt(float | None, f"Clip the global gradient norm to this (0 = off). Default: {default:g}.",
               panel=TRAINING)


def SaveEvery(default: int):  # noqa: N802
    return opt(int | None, f"Steps between checkpoints (last.ckpt + step-N.ckpt). Default: {default}.",
               panel=TRAINING)


BatchSize = opt(int | None, f"Clips per step per GPU. Default: {TRAIN.batch_size}.", panel=TRAINING)
TrainLr = opt(float | None, "Learning rate. Default: 5e-5 with --pretrained, else 1e-3.", "--lr",
              panel=TRAINING)
WeightDecay = opt(float | None, "AdamW weight decay. Default: 0.01 with --pretrained, else 0.",
                  panel=TRAINING)
EvalEvery = opt(int | None, f"Steps between validations (0 = never). Default: {TRAIN.eval_every}.",
                panel=TRAINING)
EvalSamples = opt(int | None, "Clips sampled to WAV + PNG at each validation. Default: "
                  f"{TRAIN.eval_samples}.",
                  panel=TRAINING)
TrainPretrainedDir = opt(Path | None, "Pretrained components for the validation vocoder. Default: the folder "
                         "`rtsvc prepare` used.", "--pretrained-dir", panel=MODEL)
TrainVocoder = opt(Path | None, "NSF-HiFiGAN model.ckpt for validation audio. Default: PRETRAINED_DIR/"
                   "nsf_hifigan_44.1k_hop512_128bin_2024.02/model.ckpt (none found: plots only).",
                   "--vocoder", panel=MODEL)
LoraRank = opt(int | None, "V3: train LoRA adapters of this rank on every attn.k_proj / v_proj plus the "
               "speaker table, nothing else (needs --lora-alpha). Default: off (all weights train).",
               panel=ADVANCED)
LoraAlpha = opt(float | None, "V3: LoRA scale numerator; adapters add (x A) B^T * alpha / sqrt(rank). "
                "Default: none (required with --lora-rank).", panel=ADVANCED)
FreezeAdaln = opt(bool, "V3: keep the time embedding and every adaptive norm fixed (upstream's fine-tune "
                  "option). Default: off.", "--freeze-adaln-and-tembed", panel=ADVANCED)

# distill
Teacher = opt(Path, "Teacher checkpoint (.ckpt), e.g. RUN/last.ckpt of `rtsvc train`. Required.", "--teacher")
DistillData = opt(Path, "Prepared dataset folder (`rtsvc prepare`), normally the teacher's. Required.",
                  "--data")
DistillOut = opt(Path, "Run folder for checkpoints and metrics.jsonl; the student is OUT/last.ckpt. "
                 "Required.", "--out")
Nfe = opt(int | None, "Network evaluations per block the student is made for: 1 or 2 (both are trained; this "
          f"sets its default). Default: {DISTILL.nfe}.")
DistillBatch = opt(int | None, f"Teacher trajectories per step per GPU. Default: {DISTILL.batch_size}.",
                   "--batch-size", panel=TRAINING)
Pairs = opt(int | None, "Intervals trained per trajectory (the student's batch is batch-size x pairs). "
            f"Default: {DISTILL.pairs}.",
            panel=TRAINING)
TeacherReuse = opt(int | None, "Steps that learn from one batch of teacher trajectories: every Nth step runs "
                   "the teacher (31 guided evaluations per trajectory), the steps between train on new "
                   "intervals of the last few batches kept; 1 = fresh trajectories every step. Default: "
                   f"{DISTILL.teacher_reuse}.", panel=TRAINING)
DistillLr = opt(float | None, f"Learning rate. Default: {DISTILL.lr:g}.", "--lr", panel=TRAINING)


def baked(name: str, family: str) -> object:
    """A distill option for one guidance knob baked into the student: the knob's flag, range and default."""
    knob = next(k for k in KNOB_TABLE if k.name == name)
    default = f"{knob.default:g}" + (" (off)" if knob.default == 0 else "")
    return opt(float | None, f"{family} teachers: {knob.label} strength baked into the student "
               f"({knob.range_text()}). Default: {default}.", *knob.flags, panel=ADVANCED)


BakedCfg, BakedDsCfg = baked("cfg_strength", "V2"), baked("ds_cfg_strength", "V3")
BakedSpkCfg, BakedSkipCfg = baked("spk_cfg_strength", "V3"), baked("skip_cfg_strength", "V3")
SkipBlock = opt(int | None, "V3 teachers: the block (0-based) the skip-layer pass bypasses. Default: none.",
                "--cfg-skip-layers", panel=ADVANCED)

# export
Checkpoint = Annotated[Path, typer.Argument(help="RIFT-SVC V2 or V3 checkpoint (.ckpt or .safetensors voice; "
                                            "V3 LoRA adapters are merged into a bundle) to export.")]
BundleOut = opt(Path, "Bundle directory to write, e.g. my-voice.rtsvc (replaced if it is already a bundle); "
                "with --format safetensors a file my-voice.safetensors. Required.", "--out", "-o")
ExportFormat = opt(str, "onnx: an ONNX Runtime bundle (.rtsvc) with the vocoder; safetensors: the DiT's "
                   "weights with its config and speakers as one .safetensors file to share (read without "
                   "pickle; docs/bundle.md). Default: onnx.", "--format")
MergeLora = opt(bool, "--format safetensors: fold V3 LoRA adapters into plain V3 weights (same outputs up to "
                "float rounding) instead of carrying them (bit-identical). Default: off.", panel=ADVANCED)
ExportPretrainedDir = opt(Path, "Folder of pretrained components in the upstream layout (vocoder; encoders "
                          "with --with-encoders). Default: pretrained/.", "--pretrained-dir", panel=MODEL)
ExportVocoder = opt(Path | None, "NSF-HiFiGAN model.ckpt (config.json beside it). Default: PRETRAINED_DIR/"
                    "nsf_hifigan_44.1k_hop512_128bin_2024.02/model.ckpt.", "--vocoder", panel=MODEL)
Opset = opt(int, "ONNX opset version (7-21). Default: 17.")
Fp16 = opt(bool, "Export fp16 graphs (inputs/outputs stay fp32; for GPU providers). Default: off (fp32).")
ExportSkipLayers = opt(int, "V3 models: also put the skip-layer guidance pass into the graph, bypassing "
                       "this DiT block (0-based; the bundle then honours --skip-cfg-strength with this block "
                       "only); -1 = no skip pass. Default: -1.", "--cfg-skip-layers")
WithEncoders = opt(bool, "Also export ContentVec, the Whisper encoder (V2) and FCPE's network (for --f0 "
                   "fcpe) to ONNX (large: ~0.4 GB + ~2.4 GB for the real models, FCPE 43 MB). Default: off.")
Tolerance = opt(float | None, "Largest allowed parity error, relative to the largest torch output value. "
                "Default: 1e-4 (fp32), 2e-2 (fp16).")
Int8 = opt(bool, "Then quantize for CPUs: dynamic int8 DiT and encoders, calibrated static int8 vocoder "
           "(each kept fp32 where int8 is not faster here); prints int8-vs-fp32 parity and timing. "
           "Default: off (fp32).")

# bench
BENCH_BLOCKS, BENCH_STEPS = "50,100,150,250", "2,4,8"  # rtsvc bench grids (ms, steps)
STREAMS_BATCHES, STREAMS_THREADS = "1,8", 1  # rtsvc bench --streams: compared max batches, torch threads
GAP_CROSSFADES, GAP_SEARCHES = "5,10,25,50", "0,5,10,20"  # rtsvc bench --gap grids (ms)
BenchModel = opt(Path | None, "Also benchmark this checkpoint or .rtsvc bundle. Default: the DSP voice only.",
                 "--model", "-m", panel=MODEL)
BenchBlocks = opt(str, f"Comma-separated block lengths in ms; auto is {BLOCK_AUTO}. Default: {BENCH_BLOCKS}.",
                  "--block-ms", panel=STREAMING)
BenchSteps = opt(str | None, "Comma-separated sampling steps (grid points) for models. Default: "
                 f"{BENCH_STEPS}; a distilled student: its own count.", "--steps")
BenchBackends = opt(str, "Comma-separated model backends (torch, onnx, auto). Default: auto.", "--backend",
                    panel=MODEL)
BenchDevices = opt(str, "Comma-separated torch devices (cpu, cuda) or all (cpu and cuda when present). "
                   "Default: all.", "--device", panel=MODEL)
Seconds = opt(float, "Audio streamed per configuration, in seconds. Default: 5.")
Loopback = opt(bool, "Also measure end-to-end latency of `rtsvc live` (DSP voice and --model, each block "
               "length) through PulseAudio null sinks (needs pulseaudio): mean and p95, underruns, and the "
               "split. Default: off.")
LoopbackLive = opt(str, "--loopback: more `rtsvc live` options for every row, e.g. '--audio-api pulse "
                   "--pipeline'. Default: none.")
LoopbackSeconds = opt(float, "--loopback: seconds of bursts measured per row. Default: 6.")
Gap = opt(bool, "Also measure how close streaming is to offline (log-spectral distance, dB) for each block "
          "length x crossfade (--crossfades) x SOLA search (--sola-searches), for the DSP voice and --model. "
          "Default: off.")
Crossfades = opt(str, f"--gap: comma-separated crossfades in ms. Default: {GAP_CROSSFADES}.")
SolaSearches = opt(str, f"--gap: comma-separated SOLA searches in ms. Default: {GAP_SEARCHES}.")
BenchThreads = opt(int | None, "CPU threads for torch and for each ONNX Runtime session (1 = steadiest on a "
                   "busy machine). Default: the libraries' own (every core); 1 with --streams.", "--threads",
                   panel=MODEL)
Streams = opt(str | None, "Instead: comma-separated counts of simulated real-time clients streaming through "
              "a loopback websocket server, each count run with every --max-batches value; reports latency, "
              "late blocks and the largest count held in real time. Default: off.", panel=SERVING)
MaxBatches = opt(str, "--streams: comma-separated --max-batch values to compare (1 = unbatched). Default: "
                 f"{STREAMS_BATCHES}.", panel=SERVING)

# download, doctor
To = opt(Path, "Folder to fill in the upstream layout. Default: pretrained/.")
PretrainedVoice = opt(list[str] | None, "Pretrained voice checkpoint to fetch too (repeatable): pretrain-v2, "
                      "pretrain-v3-512-8, pretrain-v3-768-12, pretrain-v3-1024-16, or none. Default: "
                      "pretrain-v2.", "--voice")
Components = opt(str, "Components for which models: v2 (ContentVec, Whisper, vocoder, RMVPE), v3 (the same "
                 "without Whisper, ~3 GB less) or all. Default: all.", "--family")
LookIn = opt(Path, "Folder of pretrained components to look into. Default: pretrained/.", "--pretrained-dir")


def run_app(app: typer.Typer) -> None:
    """The `rtsvc` console script: every user mistake is one line on stderr and exit code 2."""
    # pyworld 0.3.5 imports pkg_resources; its deprecation warning is noise for users
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
    command = typer.main.get_command(app)
    for sub in command.commands.values():
        tidy_command(sub)
    try:
        command(prog_name="rtsvc")
    except UserError as err:  # a knob's range from the library (bench, distill) names its flag too
        message = err.for_flag() if isinstance(err, KnobError) else str(err)
        # one line whatever the terminal width, and no markup parsing of the message
        console.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True, highlight=False)
        sys.exit(2)
