"""The `rtsvc` command line. Thin: parse options, call the library, print results.

Every user mistake surfaces as `rtsvc.errors.UserError`, printed as one line with exit code 2.
"""

import sys
import warnings
from pathlib import Path

import typer
from rich.console import Console
from rich.text import Text

from rtsvc.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="rtsvc: real-time voice conversion with RIFT-SVC models (live, websocket, files, training).",
)
console = Console(stderr=True)


# --- commands are added below, one section per feature; keep each a few lines of glue ---


# --- convert / download / doctor (issue 2) ---------------------------------------------------

F0_CHOICES = ("rmvpe", "fcpe", "pyworld")


def _progress_bar():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=False)


@app.command()
def convert(
    input: Path = typer.Argument(..., help="Input audio file (wav, flac, ogg, mp3; any rate; "
                                 "mixed to mono)."),
    output: Path = typer.Argument(..., help="Output file, 44.1 kHz mono; format from the extension "
                                  "(.wav, .flac, .ogg)."),
    model: Path | None = typer.Option(None, "--model", "-m", help="RIFT-SVC V2 checkpoint (.ckpt) or "
                                      "exported .rtsvc bundle. Default: none, the built-in DSP voice."),
    speaker: str | None = typer.Option(None, help="Target speaker name. Default: the model's first speaker."),
    pretrained_dir: Path = typer.Option(Path("pretrained"), help="Folder of pretrained components in "
                                        "the upstream layout. Default: pretrained/."),
    contentvec: str | None = typer.Option(None, help="ContentVec folder or hub id. Default: "
                                          "PRETRAINED_DIR/content-vec-best."),
    whisper: str | None = typer.Option(None, help="Whisper folder or hub id. Default: "
                                       "PRETRAINED_DIR/whisper-large-v3."),
    vocoder: Path | None = typer.Option(None, help="NSF-HiFiGAN model.ckpt (config.json beside it). Default: "
                                        "PRETRAINED_DIR/nsf_hifigan_44.1k_hop512_128bin_2024.02/model.ckpt."),
    rmvpe: Path | None = typer.Option(None, help="RMVPE model.pt. Default: PRETRAINED_DIR/rmvpe/model.pt."),
    steps: int = typer.Option(32, help="Rectified-flow sampling steps (grid points, 2-64). Default: 32."),
    cfg_strength: float = typer.Option(2.0, help="Classifier-free guidance strength (0-10, 0 = off). "
                                       "Default: 2.0."),
    pitch: float = typer.Option(0.0, help="Pitch shift in semitones (-36 to 36). Default: 0."),
    formant: float = typer.Option(1.0, help="Formant shift factor, DSP voice only (0.5-2.0). Default: 1.0."),
    f0: str | None = typer.Option(None, help="F0 extractor: rmvpe, fcpe or pyworld. Default: rmvpe with "
                                  "--model; the DSP voice always uses pyworld."),
    seed: int = typer.Option(0, help="Random seed of the sampler noise (integer). Default: 0."),
    device: str = typer.Option("auto", help="Torch device: auto, cpu or cuda. Default: auto "
                               "(CUDA if present)."),
    backend: str = typer.Option("auto", help="Model backend: auto, torch or onnx. Default: auto (onnx for "
                                ".rtsvc bundles, torch for .ckpt)."),
    providers: str | None = typer.Option(None, help="ONNX Runtime providers for .rtsvc bundles, in order, "
                                         "e.g. cuda,cpu (tensorrt, cuda, cpu). Default: automatic (the "
                                         "first of TensorRT, CUDA that starts here, then CPU)."),
    precision: str = typer.Option("fp32", help="Torch compute precision on CUDA: fp32, fp16 or bf16 "
                                  "(CPU always fp32). Default: fp32."),
    restore_loudness: bool = typer.Option(False, help="Give each slice back its input loudness instead "
                                          "of the model's -18 LUFS. Default: off."),
    stream: bool = typer.Option(False, help="Convert through the streaming engine block by block "
                                "(what live/serve hear) instead of offline slices. Default: off."),
    block_ms: float = typer.Option(150.0, help="--stream: block length in ms. Default: 150."),
    context_ms: float = typer.Option(300.0, help="--stream: left context in ms. Default: 300."),
    crossfade_ms: float = typer.Option(25.0, help="--stream: SOLA crossfade in ms. Default: 25."),
) -> None:
    """Convert a recording offline into the target voice (or through the DSP voice with no --model)."""
    from rtsvc.audio import load_audio, save_audio
    from rtsvc.model_voice import check_input_audio, check_output_path, convert_offline
    from rtsvc.settings import Knobs, validate_knobs

    if f0 is not None and f0 not in F0_CHOICES:
        raise UserError(f"unknown --f0 {f0!r}: use rmvpe, fcpe or pyworld")
    knobs = validate_knobs(Knobs(speaker=speaker, pitch_shift=pitch, formant_shift=formant,
                                 cfg_strength=cfg_strength, steps=steps, seed=seed))
    check_output_path(output)
    audio = check_input_audio(load_audio(input)[0])
    if model is None:
        from rtsvc.dsp_voice import DspVoice

        if f0 not in (None, "pyworld"):
            console.print(f"note: the DSP voice uses pyworld for F0; --f0 {f0} is ignored", highlight=False)
        voice, target_lufs = DspVoice(), None
    else:
        from rtsvc.backends import open_model
        from rtsvc.pretrained import resolve_pretrained

        if formant != 1.0:
            console.print("note: --formant applies to the DSP voice only; ignored with --model",
                          highlight=False)
        paths = resolve_pretrained(pretrained_dir, contentvec=contentvec, whisper=whisper, vocoder=vocoder,
                                   rmvpe=rmvpe, need=_needed_components(model, f0 or "rmvpe"))
        voice = open_model(model, pretrained=paths, backend=backend, device=device, f0=f0 or "rmvpe",
                           precision=precision, speaker=speaker, providers=providers, streaming=stream)
        target_lufs = -18.0
    with _progress_bar() as bar:
        task = bar.add_task("streaming" if stream else "converting", total=None)
        update = lambda done, total: bar.update(task, completed=done, total=total)  # noqa: E731
        if stream:
            from rtsvc.engine import StreamConfig, convert_stream

            config = StreamConfig(block_ms=block_ms, context_ms=context_ms, crossfade_ms=crossfade_ms)
            out = convert_stream(voice, audio, knobs, config.validate(), progress=update)
        else:
            out = convert_offline(voice, audio, knobs, progress=update, target_lufs=target_lufs,
                                  restore_loudness=restore_loudness)
    save_audio(output, out, voice.sample_rate)
    console.print(f"wrote {output} ({len(out) / voice.sample_rate:.2f} s)", highlight=False)


def _needed_components(model: Path, f0: str) -> tuple[str, ...]:
    """What a model needs from the pretrained dir (a bundle may carry its own vocoder)."""
    need = ["contentvec", "whisper", "vocoder"] + (["rmvpe"] if f0 == "rmvpe" else [])
    if model.is_dir():  # .rtsvc bundle: vocoder.onnx inside (+ encoders if exported --with-encoders)
        from rtsvc.bundle import bundle_components

        need = [n for n in need if n not in bundle_components(model)]
    return tuple(need)


@app.command()
def download(
    to: Path = typer.Option(Path("pretrained"), help="Folder to fill in the upstream layout. "
                            "Default: pretrained/."),
) -> None:
    """Fetch ContentVec, Whisper large-v3, NSF-HiFiGAN and RMVPE from the Hugging Face hub."""
    from rtsvc.pretrained import download_pretrained

    path = download_pretrained(to)  # huggingface_hub shows its own progress bars
    console.print(f"pretrained components are in {path}", highlight=False, soft_wrap=True)


@app.command()
def doctor(
    pretrained_dir: Path = typer.Option(Path("pretrained"), help="Folder of pretrained components to "
                                        "look into. Default: pretrained/."),
) -> None:
    """Show versions, torch devices, working ONNX Runtime providers, audio devices, found components."""
    from rtsvc.doctor import doctor_report, render_report

    Console().print(render_report(doctor_report(pretrained_dir)))


# --- serve (issue 5) -------------------------------------------------------------------------


@app.command()
def serve(
    model: Path | None = typer.Option(None, "--model", "-m", help="RIFT-SVC V2 checkpoint (.ckpt) or "
                                      "exported .rtsvc bundle. Default: none, the built-in DSP voice."),
    speaker: str | None = typer.Option(None, help="Default speaker for new clients (clients may pick "
                                       "another). Default: the model's first speaker."),
    pretrained_dir: Path = typer.Option(Path("pretrained"), help="Folder of pretrained components in "
                                        "the upstream layout. Default: pretrained/."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on; anything but loopback needs "
                             "--token. Default: 127.0.0.1."),
    port: int = typer.Option(8765, help="TCP port for the websocket, /healthz and the page. Default: 8765."),
    token: str | None = typer.Option(None, envvar="RTSVC_TOKEN", help="Shared secret clients must send "
                                     "(start message or ?token=), at least 8 characters. Default: none "
                                     "(loopback only). Also read from $RTSVC_TOKEN."),
    max_clients: int = typer.Option(8, help="Most simultaneous streams; more are refused with close "
                                    "code 1013. Default: 8."),
    max_frame_bytes: int = typer.Option(1 << 20, help="Largest binary frame in bytes (close code 1009 "
                                        "above it). Default: 1048576 (1 MiB)."),
    idle_timeout: float = typer.Option(30.0, help="Seconds without any message before a client is "
                                       "closed (code 1008). Default: 30."),
    allowed_origin: list[str] | None = typer.Option(None, help="Extra browser origin allowed to connect "
                                                    "(repeatable; '*' allows any). The page's own origin "
                                                    "and non-browser clients are always allowed. "
                                                    "Default: none."),
    workers: int = typer.Option(0, help="Inference threads shared by all clients. Default: 0 (one per "
                                "CPU core, at most 8)."),
    pitch: float = typer.Option(0.0, help="Default pitch shift in semitones (-36 to 36). Default: 0."),
    formant: float = typer.Option(1.0, help="Default formant shift factor, DSP voice only (0.5-2.0). "
                                  "Default: 1.0."),
    gate: float = typer.Option(-50.0, help="Default noise gate in dBFS (-120 to 0): quieter blocks give "
                               "silence and skip the model. Default: -50."),
    input_gain: float = typer.Option(0.0, help="Default input gain in dB (-40 to 40). Default: 0."),
    output_gain: float = typer.Option(0.0, help="Default output gain in dB (-40 to 40). Default: 0."),
    steps: int = typer.Option(4, help="Default rectified-flow sampling steps while streaming (2-64). "
                              "Default: 4."),
    cfg_strength: float = typer.Option(2.0, help="Default classifier-free guidance strength (0-10). "
                                       "Default: 2.0."),
    block_ms: float = typer.Option(150.0, help="Engine block length in ms (latency and compute per "
                                   "block). Default: 150."),
    context_ms: float = typer.Option(300.0, help="Left context per block in ms. Default: 300."),
    crossfade_ms: float = typer.Option(25.0, help="SOLA crossfade in ms. Default: 25."),
    f0: str | None = typer.Option(None, help="F0 extractor for models: rmvpe, fcpe or pyworld. "
                                  "Default: rmvpe."),
    device: str = typer.Option("auto", help="Torch device: auto, cpu or cuda. Default: auto."),
    backend: str = typer.Option("auto", help="Model backend: auto, torch or onnx. Default: auto (onnx "
                                "for .rtsvc bundles, torch for .ckpt)."),
    providers: str | None = typer.Option(None, help="ONNX Runtime providers for .rtsvc bundles, in order, "
                                         "e.g. cuda,cpu (tensorrt, cuda, cpu). Default: automatic (the "
                                         "first of TensorRT, CUDA that starts here, then CPU)."),
    precision: str = typer.Option("fp32", help="Torch precision on CUDA: fp32, fp16 or bf16. "
                                  "Default: fp32."),
) -> None:
    """Serve the websocket streaming endpoint (protocol v1), /healthz and the browser page for OBS."""
    from rtsvc.engine import StreamConfig
    from rtsvc.server import ServerConfig, check_config, dsp_source, model_source
    from rtsvc.server import serve as run_server
    from rtsvc.settings import Knobs, validate_knobs

    config = ServerConfig(host=host, port=port, token=token, max_clients=max_clients,
                          max_frame_bytes=max_frame_bytes, idle_timeout_s=idle_timeout,
                          allowed_origins=tuple(allowed_origin or ()), workers=workers)
    check_config(config)  # refuse an open bind without a token before loading any model
    knobs = validate_knobs(Knobs(speaker=speaker, pitch_shift=pitch, formant_shift=formant, gate_db=gate,
                                 input_gain_db=input_gain, output_gain_db=output_gain, steps=steps,
                                 cfg_strength=cfg_strength))
    stream_config = StreamConfig(block_ms=block_ms, context_ms=context_ms,
                                 crossfade_ms=crossfade_ms).validate()
    if f0 is not None and f0 not in F0_CHOICES:
        raise UserError(f"unknown --f0 {f0!r}: use rmvpe, fcpe or pyworld")
    if model is None:
        source = dsp_source()
    else:
        from rtsvc.backends import open_model
        from rtsvc.pretrained import resolve_pretrained

        paths = resolve_pretrained(pretrained_dir, need=_needed_components(model, f0 or "rmvpe"))
        source = model_source(open_model(model, pretrained=paths, backend=backend, device=device,
                                         f0=f0 or "rmvpe", precision=precision, providers=providers,
                                         streaming=True), model.name)
    if speaker is not None and speaker not in source.speakers:
        raise UserError(f"unknown speaker {speaker!r}; the model has: {', '.join(source.speakers)}")

    def ready(server) -> None:
        where = f"{host}:{server.port}"
        console.print(f"rtsvc serving {source.name} voice on http://{where}/ (page, /healthz) and "
                      f"ws://{where}/v1/stream; Ctrl-C stops", highlight=False, soft_wrap=True)

    run_server(config, source, knobs, stream_config, on_ready=ready)


# --- export (issue 4) ------------------------------------------------------------------------


@app.command("export")
def export_cmd(
    ckpt: Path = typer.Argument(..., help="RIFT-SVC V2 checkpoint (.ckpt) to export."),
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
    with_encoders: bool = typer.Option(False, help="Also export ContentVec and the Whisper encoder to "
                                       "ONNX (large: ~0.4 GB + ~2.4 GB for the real models). Default: off."),
    tolerance: float | None = typer.Option(None, help="Largest allowed parity error, relative to the "
                                           "largest torch output value. Default: 1e-4 (fp32), 2e-2 (fp16)."),
) -> None:
    """Export a checkpoint + vocoder to an ONNX Runtime bundle (.rtsvc), checked against torch."""
    from rich.table import Table

    from export.onnx_export import export_bundle, export_steps

    with _progress_bar() as bar:
        task = bar.add_task("exporting", total=export_steps(with_encoders))
        started = []

        def step(label: str) -> None:  # called as each step starts: the previous ones are done
            bar.update(task, description=label, completed=len(started))
            started.append(label)

        result = export_bundle(ckpt, out, pretrained_dir=pretrained_dir, vocoder=vocoder, opset=opset,
                               fp16=fp16, with_encoders=with_encoders, tolerance=tolerance, progress=step)
        bar.update(task, completed=export_steps(with_encoders), description="done")
    table = Table(title="parity: ONNX Runtime (CPU) vs torch")
    for col in ("graph", "batch", "frames", "max abs error", "max |torch|", "relative", "ok"):
        table.add_column(col, justify="left" if col == "graph" else "right")
    for r in result.rows:
        table.add_row(r.graph, str(r.batch), str(r.frames), f"{r.max_abs:.2e}", f"{r.ref_max:.3g}",
                      f"{r.rel:.2e}", "yes" if r.ok else "[bold red]NO[/]")
    Console().print(table)
    if not result.ok:
        worst = max(result.failures(), key=lambda r: r.rel)
        raise UserError(f"parity check failed: {worst.graph} at {worst.frames} frames differs by "
                        f"{worst.rel:.2e} (relative) > tolerance {worst.tolerance:g}; no bundle written")
    exporters = ", ".join(f"{k}: {v}" for k, v in result.exporters.items())
    console.print(f"wrote {result.path} (exporter {exporters})", highlight=False)


# --- prepare / train (issue 6) ---------------------------------------------------------------


@app.command()
def prepare(
    data: Path = typer.Argument(..., help="Dataset folder: DATA/SPEAKER/*.wav (flac, ogg, mp3 too); "
                                "one subfolder per speaker."),
    pretrained_dir: Path = typer.Option(Path("pretrained"), help="Folder of pretrained components in "
                                        "the upstream layout. Default: pretrained/."),
    f0: str = typer.Option("rmvpe", help="F0 extractor: rmvpe, fcpe or pyworld. Default: rmvpe."),
    workers: int = typer.Option(2, help="Files processed in parallel (threads sharing the encoders). "
                                "Default: 2."),
    device: str = typer.Option("auto", help="Torch device for the encoders: auto, cpu or cuda. "
                               "Default: auto (CUDA if present)."),
    contentvec: str | None = typer.Option(None, help="ContentVec folder or hub id. Default: "
                                          "PRETRAINED_DIR/content-vec-best."),
    whisper: str | None = typer.Option(None, help="Whisper folder or hub id. Default: "
                                       "PRETRAINED_DIR/whisper-large-v3."),
    rmvpe: Path | None = typer.Option(None, help="RMVPE model.pt. Default: PRETRAINED_DIR/rmvpe/model.pt."),
) -> None:
    """Prepare recordings for training: 44.1 kHz, -18 LUFS, sliced, features cached (resumable)."""
    from rich.table import Table

    from training.prepare import CACHE_DIR, find_sources, make_feature_fn, prepare_dataset

    if f0 not in F0_CHOICES:
        raise UserError(f"unknown --f0 {f0!r}: use rmvpe, fcpe or pyworld")
    find_sources(data)  # a wrong folder fails before the encoders load
    extract, settings = make_feature_fn(pretrained_dir, f0, device, contentvec, whisper,
                                        str(rmvpe) if rmvpe else None)
    with _progress_bar() as bar:
        task = bar.add_task("preparing", total=None)
        update = lambda done, total, name: bar.update(task, completed=done, total=total)  # noqa: E731
        result = prepare_dataset(data, extract, settings, workers=workers, on_progress=update)
    for skipped in result.skipped:
        console.print(f"[yellow]skipped[/] {skipped.path}: {skipped.reason}", highlight=False)
    table = Table(title=f"prepared {data} ({CACHE_DIR}/)")
    for col in ("speaker", "files", "clips", "minutes"):
        table.add_column(col, justify="left" if col == "speaker" else "right")
    for name, info in sorted(result.speakers.items()):
        table.add_row(name, str(info["sources"]), str(info["clips"]), f"{info['seconds'] / 60:.1f}")
    Console().print(table)
    console.print(f"{result.processed} file(s) processed, {result.reused} already done, "
                  f"{len(result.skipped)} skipped; metadata: {result.metadata_path}", highlight=False)


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
    precision: str = typer.Option("auto", help="auto, fp32, bf16 or fp16 (autocast). Default: auto "
                                  "(bf16 on a CUDA GPU that has it, else fp32)."),
    save_every: int = typer.Option(1000, help="Steps between checkpoints (last.ckpt + step-N.ckpt). "
                                   "Default: 1000."),
    eval_every: int = typer.Option(1000, help="Steps between validations (0 = never). Default: 1000."),
    log_every: int = typer.Option(10, help="Steps between metrics.jsonl lines. Default: 10."),
    eval_samples: int = typer.Option(2, help="Clips sampled to WAV + PNG at each validation. Default: 2."),
    num_workers: int = typer.Option(2, help="DataLoader worker processes. Default: 2."),
    seed: int = typer.Option(2025, help="Random seed (batches, crops, noise). Default: 2025."),
    resume: bool = typer.Option(False, help="Continue OUT/last.ckpt at its exact step. Default: off."),
    device: str = typer.Option("auto", help="Torch device: auto, cpu or cuda. Default: auto "
                               "(under torchrun: one GPU per rank)."),
    pretrained_dir: Path | None = typer.Option(None, help="Pretrained components for the validation "
                                               "vocoder. Default: the folder `rtsvc prepare` used."),
    vocoder: Path | None = typer.Option(None, help="NSF-HiFiGAN model.ckpt for validation audio. Default: "
                                        "PRETRAINED_DIR/nsf_hifigan_44.1k_hop512_128bin_2024.02/model.ckpt "
                                        "(none found: plots only)."),
) -> None:
    """Train a RIFT-SVC V2 model on a prepared dataset (fine-tune or from scratch; torchrun for DDP)."""
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
        vocoder=str(vocoder) if vocoder else None))
    if result.rank != 0:  # torchrun: one report, from rank 0
        return
    new = set(result.new_speakers)
    console.print("speakers: " + ", ".join(f"{n}{' (new)' if n in new else ''}" for n in result.speakers),
                  highlight=False)
    state = "stopped (Ctrl-C)" if result.interrupted else "finished"
    console.print(f"{state} at step {result.global_step}; checkpoint: {result.last_checkpoint}"
                  + (" (continue with --resume)" if result.interrupted else ""), highlight=False)


# --- devices / live / bench (issue 3) --------------------------------------------------------


@app.command()
def devices() -> None:
    """List audio devices (index, name, channels, default rate) for --input / --output."""
    from rich.table import Table

    from rtsvc.live import list_devices

    table = Table(title="audio devices (PortAudio)")
    for col in ("index", "name", "host API", "in", "out", "default Hz", "default"):
        table.add_column(col, justify="right" if col in ("index", "in", "out", "default Hz") else "left")
    found = list_devices()
    if not found:
        console.print("no audio devices found (no sound card, or PulseAudio/PipeWire not running)",
                      highlight=False)
        return
    for d in found:
        flags = (("input", d["default_input"]), ("output", d["default_output"]))
        default = "/".join(name for name, on in flags if on)
        table.add_row(str(d["index"]), d["name"], d["hostapi"], str(d["inputs"]), str(d["outputs"]),
                      str(d["default_rate"]), default)
    Console().print(table)


def _csv(text: str, kind: type, what: str) -> list:
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"{what} must be a comma-separated list of numbers, got {text!r}") from None


@app.command()
def live(
    model: Path | None = typer.Option(None, "--model", "-m", help="RIFT-SVC V2 checkpoint (.ckpt) or "
                                      "exported .rtsvc bundle. Default: none, the built-in DSP voice."),
    speaker: str | None = typer.Option(None, help="Target speaker name. Default: the model's first speaker."),
    pretrained_dir: Path = typer.Option(Path("pretrained"), help="Folder of pretrained components in "
                                        "the upstream layout. Default: pretrained/."),
    input: str | None = typer.Option(None, "--input", "-i", help="Input device: index or (part of) its "
                                     "name, see `rtsvc devices`. Default: the system default input."),
    output: str | None = typer.Option(None, "--output", "-o", help="Output device: index or (part of) "
                                      "its name. Default: the system default output."),
    input_rate: int | None = typer.Option(None, help="Input device rate in Hz. Default: the device's."),
    output_rate: int | None = typer.Option(None, help="Output device rate in Hz. Default: the device's."),
    pitch: float = typer.Option(0.0, help="Pitch shift in semitones (-36 to 36). Default: 0."),
    formant: float = typer.Option(1.0, help="Formant shift factor, DSP voice only (0.5-2.0). Default: 1.0."),
    gate: float = typer.Option(-50.0, help="Noise gate in dBFS (-120 to 0): quieter blocks give silence "
                               "and skip the voice. Default: -50."),
    input_gain: float = typer.Option(0.0, help="Input gain in dB (-40 to 40). Default: 0."),
    output_gain: float = typer.Option(0.0, help="Output gain in dB (-40 to 40). Default: 0."),
    steps: int = typer.Option(4, help="Rectified-flow sampling steps for models (2-64). Default: 4."),
    cfg_strength: float = typer.Option(2.0, help="Classifier-free guidance strength (0-10). Default: 2.0."),
    block_ms: float = typer.Option(150.0, help="Engine block length in ms (rounded to 11.6 ms mel "
                                   "frames). Default: 150."),
    context_ms: float = typer.Option(300.0, help="Left context per block in ms. Default: 300."),
    crossfade_ms: float = typer.Option(25.0, help="SOLA crossfade in ms. Default: 25."),
    sola_search_ms: float = typer.Option(10.0, help="SOLA search window in ms. Default: 10."),
    jitter_ms: float = typer.Option(40.0, help="Output buffer primed with this much silence (ms) to "
                                    "absorb block-wise delivery. Default: 40."),
    duration: float | None = typer.Option(None, help="Stop after this many seconds and exit 0. "
                                          "Default: run until Ctrl-C or q."),
    record: Path | None = typer.Option(None, help="Also write the converted output to this audio file "
                                       "(output device rate). Default: none."),
    f0: str | None = typer.Option(None, help="F0 extractor for models: rmvpe, fcpe or pyworld. "
                                  "Default: rmvpe."),
    device: str = typer.Option("auto", help="Torch device: auto, cpu or cuda. Default: auto."),
    backend: str = typer.Option("auto", help="Model backend: auto, torch or onnx. Default: auto."),
    precision: str = typer.Option("fp32", help="Torch precision on CUDA: fp32, fp16 or bf16. "
                                  "Default: fp32."),
) -> None:
    """Microphone -> voice -> speaker in real time. Keys: up/down pitch, g/G gate, q quit (see docs)."""
    from rtsvc.engine import StreamConfig
    from rtsvc.live import open_voice, run_live
    from rtsvc.settings import Knobs, RuntimeSettings, validate_knobs

    if f0 is not None and f0 not in F0_CHOICES:
        raise UserError(f"unknown --f0 {f0!r}: use rmvpe, fcpe or pyworld")
    knobs = validate_knobs(Knobs(speaker=speaker, pitch_shift=pitch, formant_shift=formant, gate_db=gate,
                                 input_gain_db=input_gain, output_gain_db=output_gain, steps=steps,
                                 cfg_strength=cfg_strength))
    config = StreamConfig(block_ms=block_ms, context_ms=context_ms, crossfade_ms=crossfade_ms,
                          sola_search_ms=sola_search_ms).validate()
    if duration is not None and duration <= 0:
        raise UserError(f"--duration must be positive seconds, got {duration:g}")
    voice = open_voice(model, pretrained_dir, backend=backend, device=device, f0=f0 or "rmvpe",
                       precision=precision)
    if speaker is not None and speaker not in voice.speakers:
        raise UserError(f"unknown speaker {speaker!r}; the voice has: {', '.join(voice.speakers)}")
    result = run_live(voice, RuntimeSettings(knobs), config, input_device=input, output_device=output,
                      input_rate=input_rate, output_rate=output_rate, duration=duration, record=record,
                      jitter_ms=jitter_ms, console=console)
    console.print(f"stopped after {result['seconds']:.1f} s: {result['blocks']} blocks "
                  f"({result['gated_blocks']} gated), compute {result['compute_ms_mean']:.1f} ms/block "
                  f"(p99 {result['compute_ms_p99']:.1f}), underruns {result['underruns']}, "
                  f"overruns {result['overruns']}" + (f", recorded {record}" if record else ""),
                  highlight=False, soft_wrap=True)


@app.command()
def bench(
    model: Path | None = typer.Option(None, "--model", "-m", help="Also benchmark this checkpoint or "
                                      ".rtsvc bundle. Default: the DSP voice only."),
    pretrained_dir: Path = typer.Option(Path("pretrained"), help="Folder of pretrained components. "
                                        "Default: pretrained/."),
    block_ms: str = typer.Option("50,100,150,250", help="Comma-separated block lengths in ms. "
                                 "Default: 50,100,150,250."),
    steps: str = typer.Option("2,4,8", help="Comma-separated sampling steps for models. Default: 2,4,8."),
    backend: str = typer.Option("auto", help="Comma-separated model backends (torch, onnx, auto). "
                                "Default: auto."),
    device: str = typer.Option("all", help="Comma-separated torch devices (cpu, cuda) or all (cpu and "
                               "cuda when present). Default: all."),
    context_ms: float = typer.Option(300.0, help="Left context in ms. Default: 300."),
    crossfade_ms: float = typer.Option(25.0, help="SOLA crossfade in ms. Default: 25."),
    seconds: float = typer.Option(5.0, help="Audio streamed per configuration, in seconds. Default: 5."),
    loopback: bool = typer.Option(False, help="Also measure end-to-end latency of `rtsvc live` through "
                                  "PulseAudio null sinks (needs pulseaudio). Default: off."),
    gap: bool = typer.Option(False, help="Also measure how close streaming is to offline (log-spectral "
                             "distance, dB) for each block length x crossfade (--crossfades) x SOLA "
                             "search (--sola-searches), DSP voice. Default: off."),
    crossfades: str = typer.Option("5,10,25,50", help="--gap: comma-separated crossfades in ms. "
                                   "Default: 5,10,25,50."),
    sola_searches: str = typer.Option("0,5,10,20", help="--gap: comma-separated SOLA searches in ms. "
                                      "Default: 0,5,10,20."),
) -> None:
    """Per-block compute time (mean/p50/p99), real-time factor and latency per configuration."""
    from rtsvc.bench import BenchCase, measure_loopback, run_bench
    from rtsvc.engine import StreamConfig
    from rtsvc.live import open_voice

    devices_ = ["cpu"] + (["cuda"] if _cuda_available() else []) if device == "all" else device.split(",")
    configs = [StreamConfig(block_ms=b, context_ms=context_ms, crossfade_ms=crossfade_ms).validate()
               for b in _csv(block_ms, float, "--block-ms")]
    cases = [BenchCase("dsp", "cpu", open_voice(None), c) for c in configs]
    if model is not None:
        for dev in devices_:
            for bk in backend.split(","):
                voice = open_voice(model, pretrained_dir, backend=bk, device=dev)
                cases += [BenchCase(f"{model.name} {bk}", dev, voice, c, s)
                          for c in configs for s in _csv(steps, int, "--steps")]
    wide = Console(width=None if sys.stdout.isatty() else 150)  # tables are not squeezed in logs
    run_bench(cases, seconds, console=wide)
    if gap:
        from rtsvc.bench import gap_table, streaming_gap

        grid = [StreamConfig(block_ms=c.block_ms, context_ms=context_ms, crossfade_ms=x, sola_search_ms=s)
                for c in configs for x in _csv(crossfades, float, "--crossfades")
                for s in _csv(sola_searches, float, "--sola-searches")]
        with _progress_bar() as bar:
            bar.add_task("streaming vs offline", total=None)
            rows = streaming_gap(open_voice(None), [g.validate() for g in grid])
        wide.print(gap_table(rows))
    if loopback:
        console.print("loopback: starting PulseAudio and `rtsvc live` (DSP voice) ...", highlight=False)
        res = measure_loopback(["--block-ms", str(configs[0].block_ms), "--context-ms", str(context_ms),
                                "--crossfade-ms", str(crossfade_ms), "--gate", "-70"])
        wide.print(f"loopback end-to-end latency of `rtsvc live` (block {configs[0].block_ms:g} ms): "
                        f"{res['live_ms']:.0f} ms (rig total {res['total_ms']:.0f} ms, rig alone "
                        f"{res['rig_ms']:.0f} ms)\n  live: {res['live_summary']}", highlight=False)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def main() -> None:
    # pyworld 0.3.5 imports pkg_resources; its deprecation warning is noise for users
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
    try:
        app()
    except UserError as err:
        # one line whatever the terminal width, and no markup parsing of the message
        console.print(Text.assemble(("error: ", "bold red"), str(err)), soft_wrap=True, highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
