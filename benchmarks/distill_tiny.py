"""Few-step sampling on a tiny model, end to end: schedules vs a distilled student.

    PYTHONPATH=$PWD python benchmarks/distill_tiny.py --work /tmp/distill-tiny [--stage all]

Stages (each reuses the previous one's files in WORK):
  data     espeak-ng sentences in two voices -> `prepare` with tiny random encoders (tests/tiny_encoders)
           and WORLD F0; then every clip gets two twins with the same conditioning and the mel
           tilted up or down by +-TILT (log-mel units): a bimodal target, so the teacher's flow
           must bend (a deterministic target gives an almost straight flow)
  teacher  `rtsvc train` from scratch (TEACHER_MODEL) on that data
  distill  `rtsvc distill --nfe 1` from the teacher
  table    held-out clips x seeds: LSD (dB) and mean |log-mel| error against the teacher's guided
           32-point output, for the teacher at 2/3/4/8 points on each schedule and the student at
           1 and 2 evaluations
Runs on CPU with one thread (the machine is shared). A GPU only makes it faster (--device cuda).
"""

import argparse
import json
import math
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

SENTENCES = [
    "the quick brown fox jumps over the lazy dog", "she sells sea shells by the sea shore",
    "a journey of a thousand miles begins with a single step", "every cloud has a silver lining",
    "the early bird catches the worm", "actions speak louder than words", "practice makes perfect",
    "when in rome do as the romans do", "the pen is mightier than the sword",
    "better late than never", "two wrongs do not make a right", "fortune favours the bold",
    "knowledge is power and time is money", "all that glitters is not gold",
]
VOICES = {"low": "en+m3", "high": "en+f4"}
TILT = 3.0  # log-mel units at the band edges (the model's range is [-12, 2])
TEACHER_MODEL = "dit-128-2"
CFG = 2.0
SEEDS = (0, 1, 2, 3)
TEACHER_GRIDS = (2, 3, 4, 8)
DB_PER_NEPER = 20.0 / math.log(10.0)  # log-mel is ln(amplitude)


def make_data(work: Path) -> Path:
    from rtsvc.training.prepare import cache_root, load_metadata, make_feature_fn, prepare_dataset

    from tests.tiny_encoders import make_tiny_pretrained_dir

    wavs = work / "wavs"
    for speaker, voice in VOICES.items():
        (wavs / speaker).mkdir(parents=True, exist_ok=True)
        for k, text in enumerate(SENTENCES):
            out = wavs / speaker / f"s{k:02d}.wav"
            if not out.exists():
                subprocess.run(["espeak-ng", "-v", voice, "-s", "150", "-w", str(out), text], check=True)
    pretrained = make_tiny_pretrained_dir(work / "pretrained")
    extract, settings = make_feature_fn(pretrained, "pyworld", "cpu")
    prepare_dataset(wavs, extract, settings, workers=1)
    meta_path = cache_root(wavs) / "metadata.json"
    meta = load_metadata(wavs)
    if not meta.get("bimodal"):
        tilt = torch.linspace(-TILT, TILT, 128)
        clips = []
        for clip in meta["clips"]:
            data = torch.load(cache_root(wavs) / clip["file"], weights_only=True)
            for sign, tag in ((1.0, "up"), (-1.0, "down")):
                twin = dict(data, mel=data["mel"] + sign * tilt)
                name = clip["file"].replace(".pt", f"-{tag}.pt")
                torch.save(twin, cache_root(wavs) / name)
                clips.append({**clip, "file": name})
        meta["clips"], meta["bimodal"] = clips, TILT
        meta_path.write_text(json.dumps(meta, indent=1))
    return wavs


def train_teacher(work: Path, steps: int, device: str) -> Path:
    from rtsvc.training.train import TrainConfig, train

    out = work / "teacher"
    if (out / "last.ckpt").exists():
        return out / "last.ckpt"
    started = time.perf_counter()
    train(TrainConfig(data=str(work / "wavs"), out=str(out), model=TEACHER_MODEL, max_steps=steps,
                      batch_size=8, lr=2e-3, save_every=steps, eval_every=0, log_every=50, max_frame_len=128,
                      num_workers=0, device=device, progress=False))
    print(f"teacher: {steps} steps in {time.perf_counter() - started:.0f} s", flush=True)
    return out / "last.ckpt"


def distill_student(work: Path, steps: int, device: str, nfe: int = 1) -> Path:
    from rtsvc.training.distill import DistillConfig, distill

    out = work / f"student-nfe{nfe}"
    if (out / "last.ckpt").exists():
        return out / "last.ckpt"
    started = time.perf_counter()
    teacher = str(work / "teacher" / "last.ckpt")
    result = distill(DistillConfig(teacher=teacher, data=str(work / "wavs"), out=str(out), nfe=nfe,
                                   max_steps=steps, batch_size=4, pairs=4, lr=1e-3, save_every=steps,
                                   log_every=25, max_frame_len=128, num_workers=0, device=device,
                                   progress=False, cfg_strength=CFG))
    print(f"student: {result.global_step} steps in {time.perf_counter() - started:.0f} s"
          + (" (stopped by Ctrl-C; continue with --resume)" if result.interrupted else ""), flush=True)
    return out / "last.ckpt"


def held_out(work: Path, device: str):
    """(conditioning, name) of every held-out clip (first 256 frames)."""
    from rtsvc.training.dataset import ClipDataset, collate
    from rtsvc.training.distill_loss import batch_conditioning
    from rtsvc.training.prepare import load_metadata

    meta = load_metadata(work / "wavs")
    spk2idx = {s: i for i, s in enumerate(meta["speakers"])}
    val = ClipDataset(work / "wavs", meta, spk2idx, "val", 256)
    for i in range(len(val)):
        batch = {k: v.to(device) for k, v in collate([val[i]]).items()}
        yield batch_conditioning(batch, "v2", {}), val.clips[i]["file"]


def errors(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(LSD dB, mean |log-mel| difference) of two log-mels [1, n, 128]."""
    diff = (a - b).float()
    lsd = (DB_PER_NEPER * diff).pow(2).mean(-1).sqrt().mean()
    return float(lsd), float(diff.abs().mean())


@torch.no_grad()
def table(work: Path, device: str) -> list[dict]:
    from rtsvc.dsp.mel import denormalize_mel
    from rtsvc.models.families import student_velocity
    from rtsvc.models.flow import N_MELS, cfg_velocity, frame_noise, sample, sample_on_grid
    from rtsvc.models.loading import load_dit
    from rtsvc.models.schedules import SCHEDULES

    teacher = load_dit(work / "teacher" / "last.ckpt", device)
    students = {p.parent.name: load_dit(p, device) for p in sorted(work.glob("student-nfe*/last.ckpt"))}
    rows: dict[str, list] = {}

    def add(name, evals, items, ref, mel):
        rows.setdefault(name, [(evals, items), []])[1].append(errors(ref, mel))

    for cond, _ in held_out(work, device):
        n = cond.f0.shape[1]
        for seed in SEEDS:
            noise = frame_noise(0, n, seed).expand(1, n, N_MELS).to(device)
            guided = lambda x, t: cfg_velocity(teacher.model, x, t, cond, CFG)  # noqa: E731, B023
            ref = denormalize_mel(sample(guided, noise, 32))
            for schedule in SCHEDULES:
                for points in TEACHER_GRIDS:
                    mel = denormalize_mel(sample(guided, noise, points, schedule))
                    add(f"teacher {schedule} {points} points", points - 1, 2 * (points - 1), ref, mel)
            for name, st in students.items():
                u = student_velocity(st)
                for points in (2, 3):
                    grid = torch.tensor(st.student.grid_for(points), device=device)
                    mel = denormalize_mel(sample_on_grid(lambda x, t, dt: u(x, t, dt, cond), noise, grid))  # noqa: B023
                    add(f"{name} {points - 1} eval", points - 1, points - 1, ref, mel)
    out = []
    for name, ((evals, items), errs) in rows.items():
        arr = np.array(errs)
        out.append({"sampler": name, "evaluations": evals, "dit_batch_items": items,
                    "lsd_db": float(arr[:, 0].mean()), "mel_l1": float(arr[:, 1].mean()),
                    "samples": len(errs)})
    return out


@torch.no_grad()
def cost(model_name: str, repeats: int, device: str) -> list[dict]:
    """Per-block DiT time on the live default window: teacher (Knobs().steps points, CFG batch of 2)
    vs a student of the same size (1 and 2 single-branch evaluations); random weights (cost does not
    depend on them), timed alternately, median of `repeats`."""
    from rtsvc.training.model import parse_model

    from rtsvc.dsp.audio import HOP_LENGTH, SAMPLE_RATE
    from rtsvc.models.dit import DiT
    from rtsvc.models.flow import Conditioning, cfg_velocity, sample, sample_on_grid
    from rtsvc.models.student import StudentInfo, make_student, v2_student_velocity
    from rtsvc.settings import Knobs
    from rtsvc.voices.defaults import DIT_CONTEXT_MS, MODEL_BLOCK_MS
    from rtsvc.voices.model import VOCODER_CONTEXT_FRAMES

    frame_ms = 1000.0 * HOP_LENGTH / SAMPLE_RATE
    frames = (round(MODEL_BLOCK_MS / frame_ms) + VOCODER_CONTEXT_FRAMES
              + round(DIT_CONTEXT_MS * SAMPLE_RATE / 1000.0 / HOP_LENGTH))
    teacher = DiT(parse_model(model_name)).to(device).eval()
    student = make_student(DiT(parse_model(model_name))).to(device).eval()
    g = torch.Generator().manual_seed(0)
    ones = torch.ones(1, frames, device=device)
    cond = Conditioning(spk=torch.zeros(1, dtype=torch.long, device=device), f0=200.0 * ones, rms=0.05 * ones,
                        cvec=torch.randn(1, frames, 768, generator=g).to(device),
                        whisper=torch.randn(1, frames, 1280, generator=g).to(device))
    noise = torch.randn(1, frames, 128, generator=g).to(device)
    knobs = Knobs()
    runs = {
        f"teacher {knobs.steps} points, CFG": lambda: sample(
            lambda x, t: cfg_velocity(teacher, x, t, cond, knobs.cfg_strength), noise, knobs.steps),
        "student 1 eval": lambda: sample_on_grid(
            lambda x, t, dt: v2_student_velocity(student, x, t, dt, cond), noise, torch.tensor([0.0, 1.0])),
        "student 2 evals": lambda: sample_on_grid(
            lambda x, t, dt: v2_student_velocity(student, x, t, dt, cond), noise,
            torch.tensor(StudentInfo(nfe=2, grid=[0.0, 16 / 31, 1.0]).grid)),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()  # warm-up
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - started) * 1000.0)
    base = float(np.median(times[next(iter(runs))]))
    return [{"model": model_name, "frames": frames, "sampler": name, "median_ms": float(np.median(t)),
             "ratio_to_teacher": float(np.median(t)) / base} for name, t in times.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--stage", default="all", choices=("data", "teacher", "distill", "table", "cost", "all"))
    ap.add_argument("--cost-model", default="dit-768-12", help="DiT size for --stage cost (random weights)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--teacher-steps", type=int, default=1500)
    ap.add_argument("--student-steps", type=int, default=400)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    stages = ("data", "teacher", "distill", "table") if args.stage == "all" else (args.stage,)
    if "data" in stages:
        make_data(args.work)
    if "teacher" in stages:
        train_teacher(args.work, args.teacher_steps, args.device)
    if "distill" in stages:
        distill_student(args.work, args.student_steps, args.device)
    if "table" in stages:
        result = table(args.work, args.device)
        (args.work / "table.json").write_text(json.dumps(result, indent=1))
        print(f"{'sampler':34s} {'evals':>5s} {'items':>5s} {'LSD dB':>8s} {'mel L1':>8s}")
        for r in result:
            print(f"{r['sampler']:34s} {r['evaluations']:5d} {r['dit_batch_items']:5d} {r['lsd_db']:8.3f} "
                  f"{r['mel_l1']:8.4f}")
    if args.stage == "cost":
        for r in cost(args.cost_model, args.repeats, args.device):
            print(f"{r['model']} {r['frames']} frames  {r['sampler']:26s} {r['median_ms']:8.1f} ms  "
                  f"x{r['ratio_to_teacher']:.2f}")


if __name__ == "__main__":
    main()
