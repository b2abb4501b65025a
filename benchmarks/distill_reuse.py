"""`rtsvc distill --teacher-reuse`: steps/s and the student's quality at equal wall time.

    PYTHONPATH=$PWD python benchmarks/distill_reuse.py --work /tmp/distill-reuse --seconds 600 --reuse 4

Uses tests/measure_distill.py's tiny setup (espeak-ng data through tiny random encoders, bimodal
targets, a dit-128-2 teacher trained from scratch), then distils two students from that teacher,
reuse 1 (the original recipe) and reuse R, in alternating chunks of CHUNK steps: each chunk goes to
the arm that has used less wall time so far, until both have used --seconds. Alternation exposes
both arms to the same load on a shared machine, so the steps/s ratio is meaningful even when the
absolute figures are not. Then measure_distill's table: each student's LSD / mel L1 against the
teacher's guided 32-point output on held-out clips (and the teacher's own few-point grids).
"""

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.distill_tiny import CFG, make_data, table, train_teacher

CHUNK = 24  # steps per turn (--chunk; a multiple of --reuse: a turn starts on a refresh)


def run_chunk(work: Path, reuse: int, until: int, chunk: int = CHUNK) -> float:
    """Continue arm `reuse` to step `until`; returns the wall seconds it took."""
    from rtsvc.training.distill import DistillConfig, distill

    out = work / f"student-nfe1-reuse{reuse}"
    started = time.perf_counter()
    distill(DistillConfig(teacher=str(work / "teacher" / "last.ckpt"), data=str(work / "wavs"), out=str(out),
                          nfe=1, max_steps=until, batch_size=4, pairs=4, lr=1e-3, save_every=chunk,
                          log_every=max(1, chunk // 2), max_frame_len=128, num_workers=0, device="cpu",
                          progress=False, cfg_strength=CFG, teacher_reuse=reuse,
                          resume=(out / "last.ckpt").exists()))
    return time.perf_counter() - started


def window_rate(work: Path, reuse: int) -> float:
    """Median steps/s of the arm's metrics windows (pure step time, no start-up)."""
    path = work / f"student-nfe1-reuse{reuse}" / "metrics.jsonl"
    rates = [json.loads(line)["steps_per_s"] for line in path.read_text().splitlines()]
    return float(np.median(rates))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--reuse", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=600.0, help="wall time per arm")
    ap.add_argument("--teacher-steps", type=int, default=1500)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=CHUNK, help="steps per turn (a multiple of --reuse)")
    args = ap.parse_args()
    if args.chunk % args.reuse:
        ap.error("--chunk must be a multiple of --reuse")
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    make_data(args.work)
    train_teacher(args.work, args.teacher_steps, "cpu")
    state = args.work / "arms.json"  # a rerun continues the arms (e.g. with a larger --seconds)
    arms = {1: {"seconds": 0.0, "steps": 0}, args.reuse: {"seconds": 0.0, "steps": 0}}
    turns = []
    if state.exists():
        saved = json.loads(state.read_text())
        arms.update({int(r): a for r, a in saved["arms"].items()})
        turns = saved["turns"]
    while min(a["seconds"] for a in arms.values()) < args.seconds:
        reuse = min(arms, key=lambda r: arms[r]["seconds"])  # alternate by time used
        arm = arms[reuse]
        spent = run_chunk(args.work, reuse, arm["steps"] + args.chunk, args.chunk)
        arm["seconds"] += spent
        arm["steps"] += args.chunk
        turns.append({"reuse": reuse, "steps": args.chunk, "seconds": round(spent, 2),
                      "load_1m": os.getloadavg()[0]})
        print(f"reuse {reuse}: {arm['steps']} steps in {arm['seconds']:.0f} s", flush=True)
        state.write_text(json.dumps({"arms": arms, "turns": turns}))
    summary = {r: {**a, "steps_per_s": a["steps"] / a["seconds"],
                   "window_steps_per_s": window_rate(args.work, r)} for r, a in arms.items()}
    base = summary[1]
    for s in summary.values():
        s["ratio_to_reuse1"] = s["steps_per_s"] / base["steps_per_s"]
        s["window_ratio_to_reuse1"] = s["window_steps_per_s"] / base["window_steps_per_s"]
    quality = table(args.work, "cpu")
    report = {"arms": summary, "turns": turns, "table": quality}
    (args.work / "reuse.json").write_text(json.dumps(report, indent=1))
    for r, s in summary.items():
        print(f"reuse {r}: {s['steps']} steps in {s['seconds']:.0f} s = {s['steps_per_s']:.3f} steps/s "
              f"(x{s['ratio_to_reuse1']:.2f}); window median {s['window_steps_per_s']:.3f} "
              f"(x{s['window_ratio_to_reuse1']:.2f})")
    print(f"{'sampler':34s} {'evals':>5s} {'LSD dB':>8s} {'mel L1':>8s}")
    for row in quality:
        print(f"{row['sampler']:34s} {row['evaluations']:5d} {row['lsd_db']:8.3f} {row['mel_l1']:8.4f}")


if __name__ == "__main__":
    main()
