"""A trained reference voice, rebuilt on this machine, and `rtsvc eval` of the speed levers on it.

Random networks say nothing about quality; this recipe trains a small real voice in about an hour on
a 2-core CPU, from clips anyone can regenerate (no weights or recordings are shipped):

1. clips: espeak-ng voices (SPEAKERS) read the same Harvard sentences, so every text exists in every
   voice (parallel references). The last HELD_OUT texts are never trained on: the SOURCE voice's
   readings are the clips converted, the TARGET voice's readings its speaker reference.
2. `rtsvc prepare` (ContentVec, Whisper for V2, RMVPE from --pretrained-dir: `rtsvc download`).
3. `rtsvc train` from scratch (--model, default dit-256-4): a short probe measures steps/s here, then
   the run is resumed to the number of steps that fills --train-minutes.
4. `rtsvc distill` the same way (--distill-minutes) -> a 1-evaluation student.
5. `rtsvc export` (ONNX bundle; the int8 copy is made by `rtsvc eval`'s int8 flag).
6. `rtsvc eval` on the levers: teacher offline (reference) vs live at each block length, student
   offline and live, ONNX fp32 vs int8, RMVPE vs FCPE vs WORLD, a shorter DiT window; then denoise
   off / RNNoise / DeepFilterNet on noisy copies of the clips.

The vocoder is the official NSF-HiFiGAN from --pretrained-dir; it is not retrained (a vocoder trained
in an hour on espeak would be the weak link and measure itself). Every stage is skipped when its
output is already in --work, so an interrupted run continues. Ship no weights: --work is scratch.

Without downloads (--build-stand-ins; no network, as on the machine this was built on) the pretrained
dir is made here first, in the official formats, so every stage runs unchanged:
- ContentVec: the real size (HuBERT base, 95M parameters) with seeded random weights. Its features
  carry the audio but were never trained to be speaker-independent, so the source speaker leaks
  into the conversion: absolute speaker similarity is pessimistic (comparisons between levers hold).
- vocoder: a small NSF-HiFiGAN (upsample_initial_channel 128, official 512) trained on the training
  clips for --vocoder-minutes (rtsvc.training.vocoder: mel L1 + multi-resolution STFT, no GAN).
- no RMVPE (a random one tracks nothing): F0 comes from FCPE (weights in the torchfcpe wheel), so
  the RMVPE lever cannot be measured; WORLD is compared with FCPE instead.
- V3 only: V2 needs Whisper large-v3, far too slow as a random real-size network on a CPU.

Full run (about an hour of training + distillation, plus prepare and eval; quiet machine):
    python benchmarks/reference_voice.py --pretrained-dir pretrained --work ref-voice
Full run without downloads (stand-ins; 15 + 30 + 15 minutes of training):
    python benchmarks/reference_voice.py --build-stand-ins --work ref-voice-si --vocoder-minutes 15 \
        --train-minutes 30 --distill-minutes 15 --held-out 4
Proof that the recipe runs (tiny random components, results meaningless):
    python benchmarks/reference_voice.py --pretrained-dir TINY --work /tmp/ref --train-steps 20 \
        --distill-steps 2 --texts 8 --held-out 2
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SPEAKERS = {"m1": "en+m1", "m3": "en+m3", "f2": "en+f2", "f4": "en+f4", "us": "en-us+m2"}
SOURCE, TARGET = "m3", "f4"  # converted clips are SOURCE's readings, in TARGET's voice
HARVARD = [  # Harvard sentences, lists 1-4 (IEEE 1969, public domain)
    "The birch canoe slid on the smooth planks.", "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.", "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.", "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.", "The hogs were fed chopped corn and garbage.",
    "Four hours of steady work faced us.", "A large size in stockings is hard to sell.",
    "The boy was there when the sun rose.", "A rod is used to catch pink salmon.",
    "The source of the huge river is the clear spring.", "Kick the ball straight and follow through.",
    "Help the woman get back to her feet.", "A pot of tea helps to pass the evening.",
    "Smoky fires lack flame and heat.", "The soft cushion broke the man's fall.",
    "The salt breeze came across from the sea.", "The girl at the booth sold fifty bonds.",
    "The small pup gnawed a hole in the sock.", "The fish twisted and turned on the bent hook.",
    "Press the pants and sew a button on the vest.", "The swan dive was far short of perfect.",
    "The beauty of the view stunned the young boy.", "Two blue fish swam in the tank.",
    "Her purse was full of useless trash.", "The colt reared and threw the tall rider.",
    "It snowed, rained, and hailed the same morning.", "Read verse out loud for pleasure.",
    "Hoist the load to your left shoulder.", "Take the winding path to reach the lake.",
    "Note closely the size of the gas tank.", "Wipe the grease off his dirty face.",
    "Mend the coat before you go out.", "The wrist was badly strained and hung limp.",
    "The stray cat gave birth to kittens.", "The young girl gave no clear response.",
    "The meal was cooked before the bell rang.", "What joy there is in living.",
]
PROBE_STEPS = 30  # steps of the probe run that measures steps/s before the budgeted run
VOCODER_CHANNELS = 128  # stand-in vocoder's upsample_initial_channel (official 512): what 2 cores can train
VOCODER_SEGMENT_FRAMES = 16  # 8192-sample training segments (openvpi: 32) - more steps in the same minutes


def rtsvc(*args: object, log: Path | None = None) -> None:
    """One `rtsvc` command (this checkout's cli.py), echoed; a failure stops the recipe."""
    cmd = [sys.executable, str(ROOT / "cli.py"), *map(str, args)]
    print("$ rtsvc " + " ".join(map(str, args)), flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    started = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    if log is not None:
        with log.open("a") as f:
            f.write(json.dumps({"command": ["rtsvc", *map(str, args)],
                                "seconds": round(time.perf_counter() - started, 1)}) + "\n")


def make_clips(work: Path, texts: int, held_out: int) -> tuple[Path, Path, Path]:
    """WORK/data/SPEAKER/NNN.wav (trained texts), WORK/eval/source/, WORK/eval/target/ (held out)."""
    import soundfile as sf
    import soxr

    if shutil.which("espeak-ng") is None:
        sys.exit("espeak-ng not found: apt-get install espeak-ng")
    data, source, target = work / "data", work / "eval" / "source", work / "eval" / "target"
    if (work / "clips.done").exists():
        return data, source, target
    rng = np.random.default_rng(0)
    for name, voice in SPEAKERS.items():
        for i, text in enumerate(HARVARD[:texts]):
            held = i >= texts - held_out
            if held and name not in (SOURCE, TARGET):
                continue
            folder = (source if name == SOURCE else target) if held else data / name
            folder.mkdir(parents=True, exist_ok=True)
            raw = folder / f"{i:03d}.raw.wav"
            # a little prosody variety per reading: pitch 35-65 (espeak's 0-99), speed 150-190 wpm
            pitch, speed = int(rng.integers(35, 66)), int(rng.integers(150, 191))
            subprocess.run(["espeak-ng", "-v", voice, "-p", str(pitch), "-s", str(speed), "-w", str(raw),
                            text], check=True, capture_output=True)
            audio, sr = sf.read(raw, dtype="float32")
            raw.unlink()
            audio = soxr.resample(audio, sr, 44100).astype(np.float32)
            pad = np.zeros(int(0.3 * 44100), np.float32)
            sf.write(folder / f"{i:03d}.wav", np.concatenate([pad, 0.5 * audio / np.abs(audio).max(), pad]),
                     44100)
    (work / "clips.done").write_text("ok\n")
    return data, source, target


def write_random_contentvec(directory: Path, seed: int = 0) -> Path:
    """A real-size ContentVec (HuBERT base + final_proj) with seeded random weights, written like the
    published `content-vec-best` (config.json + pytorch_model.bin with weight_g / weight_v names). Its
    features carry the audio but were never trained to drop the speaker: see the module docstring."""
    import torch
    from transformers import HubertConfig

    from rtsvc.features.contentvec import HubertModelWithFinalProj, save_published_layout

    torch.manual_seed(seed)
    model = HubertModelWithFinalProj(HubertConfig(classifier_proj_size=256,
                                                  architectures=["HubertModelWithFinalProj"])).eval()
    return save_published_layout(model, directory)


def build_stand_ins(pretrained: Path, data: Path, vocoder_minutes: float, vocoder_steps: int | None,
                    log: Path) -> None:
    """The pretrained dir without downloads: random real-size ContentVec + an NSF-HiFiGAN trained here on
    the training clips (rtsvc.training.vocoder). No RMVPE: the recipe then runs on FCPE."""
    from rtsvc.training.vocoder import VocoderTraining, train_vocoder

    from rtsvc.pretrained import LAYOUT

    contentvec = pretrained / LAYOUT["contentvec"]
    if not (contentvec / "pytorch_model.bin").exists():
        write_random_contentvec(contentvec)
    vocoder = (pretrained / LAYOUT["vocoder"]).parent
    if (vocoder / "model.ckpt").exists():
        return
    print(f"training the stand-in vocoder on {data} "
          f"({f'{vocoder_steps} steps' if vocoder_steps else f'{vocoder_minutes:g} minutes'})", flush=True)
    cfg = VocoderTraining(clips=data, out=vocoder.with_name(vocoder.name + ".partial"),
                          minutes=None if vocoder_steps else vocoder_minutes, max_steps=vocoder_steps or 0,
                          channels=VOCODER_CHANNELS, segment_frames=VOCODER_SEGMENT_FRAMES)
    started = time.perf_counter()
    result = train_vocoder(cfg, on_log=lambda m: print(f"vocoder {m}", flush=True))
    cfg.out.rename(vocoder)  # only a finished vocoder takes the official name
    with log.open("a") as f:
        f.write(json.dumps({"command": ["train_vocoder", str(data)], "result": result,
                            "seconds": round(time.perf_counter() - started, 1)}) + "\n")


def vocoder_ceiling(pretrained: Path, clips: Path, f0: str = "fcpe") -> dict:
    """What the vocoder alone costs: each clip re-synthesised from its own mel + F0 (no DiT), scored like
    `rtsvc eval` scores a conversion: DNSMOS before/after, Resemblyzer similarity of the copy to the
    original, mel L1 and LSD between them, F0 error of the copy (WORLD on both). Every lever's row
    carries this loss too."""
    import torch

    from rtsvc.dsp.audio import ENCODER_SAMPLE_RATE, HOP_LENGTH, resample
    from rtsvc.dsp.mel import log_mel_spectrogram
    from rtsvc.eval.metrics import (
        Dnsmos,
        SpeakerEncoder,
        cosine,
        f0_accuracy,
        level_matched,
        log_spectral_distance,
        mel_l1,
        track_f0,
    )
    from rtsvc.eval.runner import find_clips, read_clip
    from rtsvc.features.f0 import f0_to_mel_frames, make_f0_extractor
    from rtsvc.models.loading import load_vocoder
    from rtsvc.pretrained import LAYOUT

    vocoder, tracker = load_vocoder(pretrained / LAYOUT["vocoder"]), make_f0_extractor(f0)
    encoder, quality = SpeakerEncoder(), Dnsmos()
    eval_tracker = make_f0_extractor("pyworld")  # `rtsvc eval`'s default tracker
    rows = []
    for path in find_clips(clips):
        audio = read_clip(path)
        n = len(audio) // HOP_LENGTH
        audio = audio[: n * HOP_LENGTH]
        f0_frames = f0_to_mel_frames(tracker(resample(audio, 44100, ENCODER_SAMPLE_RATE)), n)
        with torch.no_grad():
            copy = vocoder(log_mel_spectrogram(audio), torch.from_numpy(f0_frames)[None],
                           generator=torch.Generator().manual_seed(0))[0].numpy()
        pitch = f0_accuracy(track_f0(audio, eval_tracker), track_f0(copy, eval_tracker))
        rows.append({"clip": path.name, "dnsmos_original": quality(audio)["ovrl"],
                     "dnsmos_copy": quality(copy)["ovrl"],
                     "similarity_copy_to_original": cosine(encoder.embed(copy), encoder.embed(audio)),
                     "mel_l1": mel_l1(level_matched(copy, audio), audio),
                     "lsd_db": log_spectral_distance(level_matched(copy, audio), audio),
                     "f0_cents": pitch.cents, "f0_gross": pitch.gross, "voicing": pitch.voicing})
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "clip"}
    return {"clips": rows, "mean": mean}


def noisy_copy(clips: Path, out: Path, snr_db: float = 10.0) -> Path:
    """The clips with room-like noise (white hiss + 50 Hz hum with harmonics) at `snr_db`: what the
    denoise lever is for."""
    import soundfile as sf

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for path in sorted(clips.glob("*.wav")):
        audio, sr = sf.read(path, dtype="float32")
        t = np.arange(len(audio)) / sr
        noise = rng.standard_normal(len(audio)) + sum(np.sin(2 * np.pi * 50 * k * t) / k for k in range(1, 6))
        level = np.sqrt(np.mean(audio ** 2)) / np.sqrt(np.mean(noise ** 2)) / 10 ** (snr_db / 20)
        mixed = audio + level * noise
        sf.write(out / path.name, (mixed / max(1.0, np.abs(mixed).max())).astype(np.float32), sr)
    return out


def steps_per_s(run: Path) -> float:
    """Median steps/s of a run's metrics.jsonl windows (the first one pays for start-up)."""
    rates = [json.loads(line).get("steps_per_s") for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r for r in rates if r]
    return float(np.median(rates[1:] if len(rates) > 1 else rates))


def budgeted(command: str, run: Path, minutes: float | None, steps: int | None, args: list, log: Path) -> int:
    """`rtsvc train|distill` for `steps`, or a probe then a resume to fill `minutes`; returns steps."""
    if steps is None:
        if not (run / "last.ckpt").exists():
            rtsvc(command, *args, "--out", run, "--max-steps", PROBE_STEPS, "--log-every", 5, log=log)
        rate = steps_per_s(run)
        steps = max(PROBE_STEPS + 1, int(rate * minutes * 60))
        print(f"{command}: {rate:.2f} steps/s here -> {steps} steps for {minutes:g} minutes", flush=True)
    done = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] \
        if (run / "metrics.jsonl").exists() else 0
    if done < steps:
        resume = ["--resume"] if (run / "last.ckpt").exists() else []
        rtsvc(command, *args, "--out", run, "--max-steps", steps, *resume, log=log)
    return steps


def lever_table(eval_json: Path) -> str:
    """eval.json as a markdown table (mean ±std over clips; fractions in %), for docs/benchmarks.md."""
    from rtsvc.eval.report import COLUMNS

    result = json.loads(eval_json.read_text())

    def cell(stat: dict | None, fmt: str) -> str:
        if not stat or stat.get("mean") is None:
            return "-"
        scale, fmt = (100.0, "{:.1f}") if "%" in fmt else (1.0, fmt)
        spread = f" ±{fmt.format(scale * stat['std'])}" if stat.get("n", 0) > 1 else ""
        return fmt.format(scale * stat["mean"]) + spread

    head = ["configuration", "steps", *(name + (" %" if "%" in fmt else "") for _, name, fmt, _ in COLUMNS),
            "RTF", "algo ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, summary in result["summary"].items():
        latency = summary.get("latency_ms")
        row = [label + (" (reference)" if label == result["reference"] else ""),
               "-" if label == "input" else str(summary.get("steps", "-")),
               *(cell(summary.get(key), fmt) for key, _, fmt, _ in COLUMNS),
               "-" if summary.get("rtf") is None else f"{summary['rtf']:.3f}",
               "-" if label == "input" else ("offline" if latency is None else f"{latency:.1f}")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("ref-voice"), help="scratch folder (default ref-voice)")
    p.add_argument("--pretrained-dir", type=Path, default=None,
                   help="official components (`rtsvc download`; default pretrained), or with "
                        "--build-stand-ins where the stand-ins are built (default WORK/pretrained-stand-ins)")
    p.add_argument("--build-stand-ins", action="store_true",
                   help="no downloads: random real-size ContentVec + a vocoder trained here; V3, FCPE")
    p.add_argument("--vocoder-minutes", type=float, default=15.0, help="stand-in vocoder's training time")
    p.add_argument("--vocoder-steps", type=int, default=None, help="fixed steps instead of --vocoder-minutes")
    p.add_argument("--family", choices=("v2", "v3"), default=None,
                   help="default v2; v3 with --build-stand-ins")
    p.add_argument("--model", default="dit-256-4", help="size trained from scratch (default dit-256-4)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--train-minutes", type=float, default=45.0)
    p.add_argument("--train-steps", type=int, default=None, help="fixed steps instead of --train-minutes")
    p.add_argument("--distill-minutes", type=float, default=15.0)
    p.add_argument("--distill-steps", type=int, default=None, help="fixed steps instead of --distill-minutes")
    p.add_argument("--texts", type=int, default=len(HARVARD), help=f"sentences used (<= {len(HARVARD)})")
    p.add_argument("--held-out", type=int, default=6, help="last sentences kept out of training")
    p.add_argument("--pitch", type=float, default=0.0, help="eval pitch shift in semitones")
    p.add_argument("--f0", default=None,
                   help="F0 extractor for prepare and the model (default rmvpe; fcpe with --build-stand-ins)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in every command (OMP_NUM_THREADS; 1 is steadiest on a busy machine)")
    a = p.parse_args()
    if a.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(a.threads)
    if not 2 <= a.held_out < a.texts <= len(HARVARD):
        p.error(f"need 2 <= --held-out < --texts <= {len(HARVARD)}")
    if a.build_stand_ins and a.family == "v2":
        p.error("--build-stand-ins builds no Whisper (a random large-v3 is too slow here): use --family v3")
    if a.build_stand_ins and a.f0 == "rmvpe":
        p.error("--build-stand-ins has no RMVPE (a random one tracks nothing): use --f0 fcpe or pyworld")
    a.family = a.family or ("v3" if a.build_stand_ins else "v2")
    a.f0 = a.f0 or ("fcpe" if a.build_stand_ins else "rmvpe")
    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "commands.jsonl"  # what ran and how long it took
    default_dir = work / "pretrained-stand-ins" if a.build_stand_ins else Path("pretrained")
    pretrained = (a.pretrained_dir or default_dir).resolve()
    data, source, target = make_clips(work, a.texts, a.held_out)
    if a.build_stand_ins:
        build_stand_ins(pretrained, data, a.vocoder_minutes, a.vocoder_steps, log)

    if not (work / "prepare.done").exists():  # (prepare itself also skips files it has done)
        rtsvc("prepare", data, "--pretrained-dir", pretrained, "--f0", a.f0, "--family", a.family,
              "--device", a.device, "--workers", 1, log=log)
        (work / "prepare.done").write_text("ok\n")
    teacher_run, student_run = work / "teacher", work / "student"
    budgeted("train", teacher_run, a.train_minutes, a.train_steps,
             ["--data", data, "--model", a.model, "--batch-size", a.batch_size, "--eval-every", 0,
              "--save-every", 500, "--num-workers", 0, "--device", a.device, "--pretrained-dir", pretrained],
             log)
    teacher = teacher_run / "last.ckpt"
    budgeted("distill", student_run, a.distill_minutes, a.distill_steps,
             ["--teacher", teacher, "--data", data, "--batch-size", 4, "--save-every", 100,
              "--num-workers", 0, "--device", a.device], log)
    student = student_run / "last.ckpt"
    bundle = work / "voice.rtsvc"
    if not bundle.exists():
        rtsvc("export", teacher, "--out", bundle, "--pretrained-dir", pretrained, log=log)

    common = ["--model", teacher, "--speaker", TARGET, "--speaker-clips", target, "--pretrained-dir",
              pretrained, "--f0", a.f0, "--pitch", a.pitch, "--device", a.device]
    levers = ["offline:steps=32,name=teacher offline 32",
              "live:block=104.5,name=teacher live 104.5",
              "live:block=150.9,name=teacher live 150.9",
              "live:block=197.3,name=teacher live 197.3",
              "live:block=150.9,dit_context=100,name=teacher live 150.9 dit-context 100",
              "live:block=150.9,encoder_context=200,name=teacher live 150.9 encoder-context 200",
              "live:block=150.9,vocoder_context=4,name=teacher live 150.9 vocoder-context 4",
              *[f"live:block=150.9,f0={f0},name=teacher live {label}"
                for f0, label in (("rmvpe", "rmvpe"), ("fcpe", "fcpe"), ("pyworld", "world"))
                if f0 != a.f0 and not (f0 == "rmvpe" and a.build_stand_ins)],  # stand-ins: no RMVPE
              f"offline:model={student},name=student offline",
              f"live:block=150.9,model={student},name=student live",
              f"live:block=150.9,model={bundle},name=onnx fp32 live",
              f"live:block=150.9,model={bundle},int8,name=onnx int8 live"]
    rtsvc("eval", *common, "--clips", source, "--out", work / "eval-levers",
          *[x for c in levers for x in ("--config", c)], log=log)
    noisy = noisy_copy(source, work / "eval" / "source-noisy")
    denoise = ["live:block=150.9,name=noisy denoise off",
               "live:block=150.9,denoise=rnnoise,name=noisy rnnoise",
               "live:block=150.9,denoise=deepfilternet,name=noisy deepfilternet"]
    rtsvc("eval", *common, "--clips", noisy, "--out", work / "eval-denoise", "--reference", denoise[0],
          *[x for c in denoise for x in ("--config", c)], log=log)
    if a.build_stand_ins:  # what the stand-in vocoder alone costs, on the converted clips and the target's
        ceiling = {name: vocoder_ceiling(pretrained, folder, a.f0) for name, folder in
                   (("source", source), ("target", target))}
        (work / "vocoder-ceiling.json").write_text(json.dumps(ceiling, indent=2) + "\n")
    tables = "".join(f"\n{name}\n\n" + lever_table(work / name / "eval.json")
                     for name in ("eval-levers", "eval-denoise"))
    (work / "levers.md").write_text(tables)
    print(tables)
    print(f"done: {work / 'eval-levers' / 'eval.json'}, {work / 'eval-denoise' / 'eval.json'} (+ eval.png); "
          f"commands and their times: {log}")


if __name__ == "__main__":
    main()
