"""The `rtsvc` command line. Thin: parse options, call the library, print results.

Every user mistake surfaces as `rtsvc.errors.UserError`, printed as one line with exit code 2.
The options (their help, defaults and panels), the knob options made from one table
(rtsvc.settings.KNOB_TABLE) and help that fits the terminal are in cli_options.py.
"""

import sys
from pathlib import Path

import typer
from rich.console import Console

from rtsvc.autoblock import start_voice
from rtsvc.commands import cli_options as o
from rtsvc.engine import StreamConfig, parse_block_ms
from rtsvc.errors import UserError
from rtsvc.features.f0_methods import DEFAULT_F0
from rtsvc.serve.server import ServerConfig
from rtsvc.settings import Knobs, RuntimeSettings
from rtsvc.voices.defaults import DIT_CONTEXT_MS
from rtsvc.voices.spec import CONCURRENT_F0, VoiceSpec, check_f0

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,  # click's help: wraps at any width, long option names on their own line
    help="rtsvc: real-time voice conversion with RIFT-SVC models (live, websocket, files, training).",
)
console, _say, _pick = o.console, o.say, o.pick
KNOBS, SERVER = Knobs(), ServerConfig()
CONVERT_STEPS = 32  # offline conversion: upstream infer.py's default sampling steps


# --- commands, in the order people use them ---------------------------------------------------


@app.command()
@o.knob_options()
def live(
    model: o.Model = None, pretrained_dir: o.PretrainedDir = Path("pretrained"), input: o.Input = None,
    output: o.Output = None, monitor: o.Monitor = None, virtual_mic: o.VirtualMicName = None,
    input_rate: o.InputRate = None, output_rate: o.OutputRate = None, block_ms: o.BlockMs = "auto",
    pitch_reference: o.PitchReference = None,
    context_ms: o.ContextMs = o.STREAM.context_ms, crossfade_ms: o.CrossfadeMs = None,
    sola_search_ms: o.SolaSearchMs = None, dit_context_ms: o.DitContextMs = DIT_CONTEXT_MS,
    encoder_context_ms: o.EncoderContextMs = None, vocoder_context: o.VocoderContext = None,
    concurrent_f0: o.ConcurrentF0 = CONCURRENT_F0, threads: o.Threads = None, jitter_ms: o.JitterMs = "auto",
    duration: o.Duration = None, record: o.Record = None, f0: o.F0 = None, device: o.Device = "auto",
    backend: o.Backend = "auto", precision: o.Precision = "fp32", providers: o.Providers = None,
    contentvec: o.ContentVec = None, whisper: o.Whisper = None, vocoder: o.Vocoder = None,
    rmvpe: o.Rmvpe = None, audio_api: o.AudioApi = o.AUDIO_API, device_buffer_ms: o.DeviceBufferMs = "low",
    device_block_ms: o.DeviceBlockMs = None, pipeline: o.Pipeline = False,
    knobs: Knobs = KNOBS, typed: dict | None = None,
) -> None:
    """Microphone -> voice -> speaker in real time. Keys: up/down pitch, f/F formant, g/G gate, q quit."""
    from rtsvc import live as lib

    config = StreamConfig(parse_block_ms(block_ms), context_ms, crossfade_ms, sola_search_ms).validate()
    jitter, buffer_ms = lib.parse_jitter_ms(jitter_ms), lib.parse_device_buffer_ms(device_buffer_ms)
    lib.check_live_options(input_rate, output_rate, duration)
    spec = _pick(VoiceSpec, locals(), speaker=knobs.speaker, streaming=True).validate()  # --model first
    lib.check_virtual_mic(virtual_mic, output)
    dev_in, dev_out, dev_mon = lib.find_devices(input, output, monitor)  # before a model loads
    voice, knobs, config, choice = start_voice(spec, knobs, typed.get("steps"), config, _say,
                                                  pipelined=pipeline)
    jitter = lib.auto_jitter_ms(choice, voice.stream_defaults.jitter_ms, _say) if jitter is None else jitter
    _say(lib.live_summary(lib.run_live(
        voice, RuntimeSettings(knobs), config, input_device=dev_in, output_device=dev_out, record=record,
        monitor_device=dev_mon, input_rate=input_rate, output_rate=output_rate, duration=duration,
        jitter_ms=jitter, console=console, virtual_mic=virtual_mic, audio_api=audio_api,
        device_block_ms=device_block_ms, device_buffer_ms=buffer_ms, pipeline=pipeline), record))


@app.command()
@o.knob_options()
def serve(
    model: o.Model = None, pretrained_dir: o.PretrainedDir = Path("pretrained"), host: o.Host = SERVER.host,
    port: o.Port = SERVER.port, token: o.Token = None, max_clients: o.MaxClients = SERVER.max_clients,
    max_frame_bytes: o.MaxFrameBytes = SERVER.max_frame_bytes, pitch_reference: o.PitchReference = None,
    idle_timeout: o.IdleTimeout = SERVER.idle_timeout_s, allowed_origin: o.AllowedOrigin = None,
    workers: o.Workers = SERVER.workers, max_lag_ms: o.MaxLagMs = SERVER.max_lag_ms,
    send_timeout: o.SendTimeout = SERVER.send_timeout_s, max_batch: o.MaxBatch = SERVER.max_batch,
    batch_deadline_ms: o.BatchDeadlineMs = SERVER.batch_deadline_ms,
    batch_runners: o.BatchRunners = SERVER.batch_runners, ray: o.Ray = None, replicas: o.Replicas = 2,
    replica_cpus: o.ReplicaCpus = 0.0, replica_gpus: o.ReplicaGpus = 0.0, block_ms: o.BlockMs = "auto",
    context_ms: o.ContextMs = o.STREAM.context_ms, crossfade_ms: o.CrossfadeMs = None,
    sola_search_ms: o.SolaSearchMs = None, dit_context_ms: o.DitContextMs = DIT_CONTEXT_MS,
    encoder_context_ms: o.EncoderContextMs = None, vocoder_context: o.VocoderContext = None,
    f0: o.F0 = None, device: o.Device = "auto", backend: o.Backend = "auto", precision: o.Precision = "fp32",
    providers: o.Providers = None, contentvec: o.ContentVec = None, whisper: o.Whisper = None,
    vocoder: o.Vocoder = None, rmvpe: o.Rmvpe = None, knobs: Knobs = KNOBS, typed: dict | None = None,
) -> None:
    """Serve the websocket streaming endpoint (protocol v1), /healthz and the browser page for OBS.

    Voice and advanced options (pitch, gate, steps...) are defaults for new clients, which may change them.
    """
    from rtsvc.serve.server import check_config, dsp_source, model_source
    from rtsvc.serve.server import serve as run_server

    config = _pick(ServerConfig, locals(), idle_timeout_s=idle_timeout, send_timeout_s=send_timeout,
                   allowed_origins=tuple(allowed_origin or ()))
    check_config(config)  # refuse an open bind without a token before loading any model
    stream_cfg = StreamConfig(parse_block_ms(block_ms), context_ms, crossfade_ms, sola_search_ms).validate()
    spec = _pick(VoiceSpec, locals(), speaker=knobs.speaker, streaming=True)
    if ray is not None:  # every replica opens the voice itself
        from rtsvc.serve.ray_serve import RayOptions, serve_on_ray

        options = RayOptions(ray, replicas, replica_cpus, replica_gpus, typed.get("steps"))
        where = f"{host}:{port}"
        serve_on_ray(config, spec.validate(), knobs, stream_cfg, options, on_ready=lambda: _say(
            f"rtsvc serving on Ray Serve ({replicas} replicas) at http://{where}/ and "
            f"ws://{where}/v1/stream; Ctrl-C stops"))
        return
    voice, knobs, stream_cfg, _ = start_voice(spec, knobs, typed.get("steps"), stream_cfg, _say)
    source = dsp_source() if model is None else model_source(voice, model.name)
    run_server(config, source, knobs, stream_cfg, on_ready=o.say_serving(host, source.name))


@app.command()
@o.knob_options(skip=("gate_db", "input_gain_db", "output_gain_db"), defaults={"steps": CONVERT_STEPS},
                aliases=o.UPSTREAM_ALIASES)
def convert(
    input: o.InputFile, output: o.OutputFile, model: o.Model = None, pitch_reference: o.PitchReference = None,
    pretrained_dir: o.PretrainedDir = Path("pretrained"), contentvec: o.ContentVec = None,
    whisper: o.Whisper = None, vocoder: o.Vocoder = None, rmvpe: o.Rmvpe = None, f0: o.F0 = None,
    device: o.Device = "auto", backend: o.Backend = "auto", providers: o.Providers = None,
    precision: o.Precision = "fp32", use_fp16: o.UseFp16 = False,
    restore_loudness: o.RestoreLoudness = None, target_loudness: o.TargetLoudness = -18.0,
    fade_duration: o.FadeDuration = o.FADE_MS, join: o.Join = "fades",
    cvec_downsample_rate: o.CvecDownsampleRate = 2, batch_size: o.BatchSize = 1, robust_f0: o.RobustF0 = 0,
    stream: o.Stream = False, block_ms: o.BlockMs = "auto", context_ms: o.ContextMs = o.STREAM.context_ms,
    crossfade_ms: o.CrossfadeMs = None,
    sola_search_ms: o.SolaSearchMs = None, dit_context_ms: o.DitContextMs = DIT_CONTEXT_MS,
    encoder_context_ms: o.EncoderContextMs = None, vocoder_context: o.VocoderContext = None,
    concurrent_f0: o.ConcurrentF0 = CONCURRENT_F0, knobs: Knobs = KNOBS, typed: dict | None = None,
) -> None:
    """Convert a recording offline into the target voice (or through the DSP voice with no --model)."""
    from rtsvc import offline

    check_f0(f0)
    upstream = offline.check_upstream_options(restore_loudness, cvec_downsample_rate, batch_size, robust_f0,
                                              model is not None and not stream, "cfg_strength" in typed)
    precision = "fp16" if use_fp16 else precision
    config = StreamConfig(parse_block_ms(block_ms), context_ms, crossfade_ms, sola_search_ms).validate()
    offline.check_output_path(output, input)
    offline.check_input_file(input)  # before any model loads; read block by block
    if model is None and f0 not in (None, "pyworld"):
        _say(f"note: the DSP voice uses pyworld for F0; --f0 {f0} is ignored")
    spec = _pick(VoiceSpec, locals(), speaker=knobs.speaker, streaming=stream)
    # a file needs no real-time tuning: an auto block is the live default, not measured
    voice, knobs, _, _ = start_voice(spec, knobs, typed.get("steps"), None, _say)
    config = config.for_voice(voice)
    with o.progress_bar(console) as bar:
        task = bar.add_task("streaming" if stream else "converting", total=None)
        update = lambda done, total: bar.update(task, completed=done, total=total)  # noqa: E731
        if stream:  # block by block through the engine, as live/serve would hear it
            seconds = offline.stream_file(voice, input, output, knobs, config, progress=update)
        else:  # piece by piece: memory bounded whatever the length. The DSP voice keeps each
            # slice's level; models hear the training loudness
            seconds = offline.convert_file(voice, input, output, knobs, progress=update, upstream=upstream,
                                           target_lufs=None if model is None else target_loudness,
                                           join=join, fade_ms=fade_duration, limit=model is None)
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
    data: o.Data, pretrained_dir: o.PretrainedDir = Path("pretrained"), f0: o.PrepareF0 = DEFAULT_F0,
    workers: o.PrepareWorkers = 2, device: o.Device = "auto", contentvec: o.ContentVec = None,
    whisper: o.Whisper = None, rmvpe: o.Rmvpe = None, family: o.Family = "v2",
) -> None:
    """Prepare recordings for training: 44.1 kHz, -18 LUFS, sliced, features cached (resumable)."""
    from rtsvc.training.prepare import (
        CACHE_DIR,
        find_sources,
        make_feature_fn,
        prepare_dataset,
        too_little_audio,
    )

    f0 = check_f0(f0)
    find_sources(data)  # a wrong folder fails before the encoders load
    extract, settings = make_feature_fn(pretrained_dir, f0, device, contentvec, whisper,
                                        str(rmvpe) if rmvpe else None, family)
    with o.progress_bar(console) as bar:
        task = bar.add_task("preparing", total=None)
        update = lambda done, total, name: bar.update(task, completed=done, total=total)  # noqa: E731
        result = prepare_dataset(data, extract, settings, workers=workers, on_progress=update)
    o.report_prepared(result, data, CACHE_DIR, too_little_audio(result))


@app.command()
def train(
    data: o.TrainData, out: o.TrainOut, pretrained: o.Pretrained = None, model: o.ModelSize = None,
    max_steps: o.MaxSteps(o.TRAIN.max_steps) = None, batch_size: o.BatchSize = None, lr: o.TrainLr = None,
    weight_decay: o.WeightDecay = None, grad_clip: o.GradClip(o.TRAIN.grad_clip) = None,
    precision: o.TrainPrecision = None, save_every: o.SaveEvery(o.TRAIN.save_every) = None,
    eval_every: o.EvalEvery = None, log_every: o.LogEvery = None, eval_samples: o.EvalSamples = None,
    num_workers: o.NumWorkers = None, seed: o.TrainSeed = None, resume: o.Resume = False,
    device: o.TrainDevice = None, pretrained_dir: o.TrainPretrainedDir = None,
    vocoder: o.TrainVocoder = None, lora_rank: o.LoraRank = None, lora_alpha: o.LoraAlpha = None,
    freeze_adaln_and_tembed: o.FreezeAdaln = False,
) -> None:
    """Train a RIFT-SVC V2 or V3 model on a prepared dataset (fine-tune, LoRA or from scratch; the family
    follows --pretrained, else the dataset's `prepare --family`; torchrun for DDP)."""
    from rtsvc.training.train import TrainConfig
    from rtsvc.training.train import train as run_training

    paths = {name: str(value) for name, value in locals().items() if isinstance(value, Path)}
    result = run_training(_pick(TrainConfig, locals(), **paths))
    o.report_trained(result)


@app.command()
def distill(
    teacher: o.Teacher, data: o.DistillData, out: o.DistillOut, nfe: o.Nfe = None,
    max_steps: o.MaxSteps(o.DISTILL.max_steps) = None, batch_size: o.DistillBatch = None,
    pairs: o.Pairs = None, teacher_reuse: o.TeacherReuse = None, cfg_strength: o.BakedCfg = None,
    ds_cfg_strength: o.BakedDsCfg = None,
    spk_cfg_strength: o.BakedSpkCfg = None, skip_cfg_strength: o.BakedSkipCfg = None,
    cfg_skip_layers: o.SkipBlock = None,
    lr: o.DistillLr = None, grad_clip: o.GradClip(o.DISTILL.grad_clip) = None,
    precision: o.TrainPrecision = None,
    save_every: o.SaveEvery(o.DISTILL.save_every) = None, log_every: o.LogEvery = None,
    num_workers: o.NumWorkers = None, seed: o.TrainSeed = None, resume: o.Resume = False,
    device: o.TrainDevice = None,
) -> None:
    """Distil a teacher into a 1-2 evaluation student without guidance branches (torchrun for DDP)."""
    from rtsvc.training.distill import DistillConfig
    from rtsvc.training.distill import distill as run_distill

    paths = {name: str(value) for name, value in locals().items() if isinstance(value, Path)}
    result = run_distill(_pick(DistillConfig, locals(), **paths,
                               cfg_skip_layers=None if cfg_skip_layers is None else [cfg_skip_layers]))
    o.report_distilled(result)


@app.command("export")
def export_cmd(
    ckpt: o.Checkpoint, out: o.BundleOut, pretrained_dir: o.ExportPretrainedDir = Path("pretrained"),
    vocoder: o.ExportVocoder = None, opset: o.Opset = 17, fp16: o.Fp16 = False,
    cfg_skip_layers: o.ExportSkipLayers = -1, with_encoders: o.WithEncoders = False,
    tolerance: o.Tolerance = None, int8: o.Int8 = False, format: o.ExportFormat = "onnx",
    merge_lora: o.MergeLora = False,
) -> None:
    """Export a checkpoint + vocoder to an ONNX Runtime bundle (.rtsvc), checked against torch, or
    the checkpoint alone to a .safetensors voice (--format safetensors) to share."""
    from rtsvc.export.onnx_export import export_bundle, export_steps

    VoiceSpec(model=ckpt).validate()  # a wrong path is said before the progress bar starts
    if format != "onnx" or merge_lora:  # a shared voice file: weights and JSON, no graphs
        from rtsvc.export.safetensors_export import export_voice_file

        return _say(export_voice_file(ckpt, out, format, merge_lora, fp16=fp16, int8=int8,
                                      with_encoders=with_encoders, cfg_skip_layers=cfg_skip_layers >= 0))
    if int8 and fp16:
        raise UserError("--int8 quantizes an fp32 export: drop --fp16")

    with o.progress_bar(console) as bar:
        task = bar.add_task("exporting", total=export_steps(with_encoders))
        result = export_bundle(ckpt, out, pretrained_dir=pretrained_dir, vocoder=vocoder, opset=opset,
                               fp16=fp16, with_encoders=with_encoders, tolerance=tolerance,
                               progress=o.step_counter(bar, task),
                               skip_layers=None if cfg_skip_layers < 0 else (cfg_skip_layers,))
        bar.update(task, completed=export_steps(with_encoders), description="done")
    o.report_parity(result)
    if int8:
        o.report_int8(result.path, o.quantize_with_progress(result.path))


@app.command()
def bench(
    model: o.BenchModel = None, pretrained_dir: o.PretrainedDir = Path("pretrained"),
    block_ms: o.BenchBlocks = o.BENCH_BLOCKS, steps: o.BenchSteps = None,
    schedule: o.Schedule = KNOBS.schedule, backend: o.BenchBackends = "auto", device: o.BenchDevices = "all",
    context_ms: o.ContextMs = o.STREAM.context_ms, crossfade_ms: o.CrossfadeMs = None,
    dit_context_ms: o.DitContextMs = DIT_CONTEXT_MS, concurrent_f0: o.ConcurrentF0 = CONCURRENT_F0,
    encoder_context_ms: o.EncoderContextMs = None, vocoder_context: o.VocoderContext = None,
    seconds: o.Seconds = 5.0, loopback: o.Loopback = False, loopback_live: o.LoopbackLive = "",
    loopback_seconds: o.LoopbackSeconds = 6.0, gap: o.Gap = False,
    crossfades: o.Crossfades = o.GAP_CROSSFADES, sola_searches: o.SolaSearches = o.GAP_SEARCHES,
    threads: o.BenchThreads = None, streams: o.Streams = None, max_batches: o.MaxBatches = o.STREAMS_BATCHES,
    batch_deadline_ms: o.BatchDeadlineMs = SERVER.batch_deadline_ms,
    batch_runners: o.BatchRunners = SERVER.batch_runners, f0: o.F0 = None, precision: o.Precision = "fp32",
    providers: o.Providers = None, contentvec: o.ContentVec = None, whisper: o.Whisper = None,
    vocoder: o.Vocoder = None, rmvpe: o.Rmvpe = None,
) -> None:
    """Per-block compute time (mean/p50/p99), real-time factor, latency and per-stage breakdown."""
    from rtsvc.bench import blocks as lib
    spec = _pick(VoiceSpec, locals(), backend="auto", device="auto")  # per case below
    if streams is not None:  # the streams bench instead of the per-block tables
        from rtsvc.bench.streams import run_streams_command

        run_streams_command(spec.with_(backend=backend, device="auto" if device == "all" else device,
                                       threads=threads or o.STREAMS_THREADS),
                            streams, max_batches, "auto" if block_ms == o.BENCH_BLOCKS else block_ms,
                            None if steps == o.BENCH_STEPS else steps, context_ms, crossfade_ms, seconds,
                            batch_deadline_ms, threads or o.STREAMS_THREADS,
                            Console(width=None if sys.stdout.isatty() else 150), batch_runners=batch_runners)
        return

    configs = [StreamConfig(block_ms=b, context_ms=context_ms, crossfade_ms=crossfade_ms).validate()
               for b in lib.parse_blocks(block_ms)]
    grid = lib.gap_grid(configs, lib.parse_list(crossfades, float, "--crossfades"),
                        lib.parse_list(sola_searches, float, "--sola-searches")) if gap else []
    devices_, backends = lib.bench_devices(device), backend.split(",")
    counts = lib.parse_list(steps, int, "--steps") if steps is not None else []
    cases = lib.make_cases(configs, spec, counts, backends, devices_, lib.parse_list(o.BENCH_STEPS, int, ""),
                           schedule)
    wide = Console(width=None if sys.stdout.isatty() else 150)  # tables are not squeezed in logs
    lib.run_bench(cases, seconds, console=wide)
    if gap:  # a model's gap on the first device and backend
        lib.run_gap(grid, spec.with_(backend=backends[0], device=devices_[0]), console=wide)
    if loopback:
        from rtsvc.bench.loopback import LOOPBACK_COLUMNS, loopback_rows

        rows = loopback_rows(lib.dsp_configs(configs), configs, model, pretrained_dir, f0, providers,
                             loopback_live, loopback_seconds, _say)
        o.print_table("end-to-end latency of `rtsvc live` through PulseAudio null sinks (ms, mic.monitor "
                      "to speaker.monitor on the server's clock)", LOOPBACK_COLUMNS, rows)


@app.command("eval", help=o.EVAL_HELP)
def eval_cmd(
    clips: o.EvalClips, config: o.EvalConfigs = None, reference: o.EvalReference = None,
    model: o.Model = None, speaker: o.EvalSpeaker = None, speaker_clips: o.SpeakerClips = None,
    pitch: o.EvalPitch = 0.0, out: o.EvalOut = Path("eval-out"), f0_tracker: o.F0Tracker = "pyworld",
    similarity: o.Similarity = True, dnsmos: o.Dnsmos = True, max_seconds: o.MaxSeconds = None,
    seed: o.EvalSeed = 0, f0: o.F0 = None, pretrained_dir: o.PretrainedDir = Path("pretrained"),
    device: o.Device = "auto", backend: o.Backend = "auto", providers: o.Providers = None,
    contentvec: o.ContentVec = None, whisper: o.Whisper = None, vocoder: o.Vocoder = None,
    rmvpe: o.Rmvpe = None, threads: o.Threads = None,
) -> None:
    from rtsvc.eval import report
    from rtsvc.eval.runner import eval_plan, prepare_eval, run_eval

    plan = eval_plan(clips, config, reference, _pick(VoiceSpec, locals()).validate(), speaker, speaker_clips,
                     pitch, seed, f0_tracker, max_seconds, similarity, dnsmos, out, o.int8_maker(out))
    prepared = prepare_eval(plan)  # bad clips and configurations: said before the progress bar
    with o.progress_bar(console) as bar:
        task = bar.add_task("evaluating", total=None)
        result = run_eval(plan, progress=lambda what, done, total: bar.update(
            task, description=what, completed=done, total=total), prepared=prepared)
    report.print_report(result, out, _say)


@app.command()
def download(to: o.To = Path("pretrained"), voice: o.PretrainedVoice = None,
             family: o.Components = "all") -> None:
    """Fetch ContentVec, Whisper large-v3 (V2 models), NSF-HiFiGAN, RMVPE and pretrained voice checkpoints."""
    from rtsvc.pretrained import DEFAULT_VOICES, components_for, download_pretrained

    voices = tuple(v for v in (voice or DEFAULT_VOICES) if v != "none")

    def step(i: int, total: int, item) -> None:  # huggingface_hub draws each file's progress bar
        _say(f"[{i + 1}/{total}] {item.label}: {item.describe()} -> {item.local_dir}")

    path = download_pretrained(to, components_for(family), voices=voices, on_step=step)
    _say(f"pretrained components are in {path}")


@app.command()
def doctor(pretrained_dir: o.LookIn = Path("pretrained")) -> None:
    """Show versions, torch devices, working ONNX Runtime providers, audio devices, found components."""
    from rtsvc.doctor import doctor_report, render_report

    Console().print(render_report(doctor_report(pretrained_dir)))


def main() -> None:
    o.run_app(app)


if __name__ == "__main__":
    main()
