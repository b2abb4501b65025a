"""`rtsvc distill --teacher-reuse`: steps/s and the student's quality at equal wall time.

    PYTHONPATH=$PWD python benchmarks/distill_reuse.py --work /tmp/distill-reuse --seconds 600 --reuse 4
    PYTHONPATH=$PWD python benchmarks/distill_reuse.py --work W --rounds 3 --no-quality   # steps/s only

Uses tests/measure_distill.py's tiny setup (espeak-ng data through tiny random encoders, bimodal
targets, a dit-128-2 teacher trained from scratch), then distils two students from that teacher,
reuse 1 (the original recipe) and reuse R, in alternating chunks of CHUNK steps: each chunk goes to
the arm that has used less wall time so far, until both have used --seconds. Alternation exposes
both arms to the same load on a shared machine, so the steps/s ratio is meaningful even when the
absolute figures are not. Then measure_distill's table: each student's LSD / mel L1 against the
teacher's guided 32-point output on held-out clips (and the teacher's own few-point grids).

`--rounds N` instead alternates strictly, reuse 1 then reuse R, N rounds of CHUNK steps each (the same
steps per arm), and reports each round's steps/s and the ratio of each adjacent pair, so the spread of
the ratio under a changing load shows. `--no-quality` skips the quality table.
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


def run_chunk(work: Path, reuse: int, until: int, chunk: int = CHUNK, cpu: list | None = None) -> float:
    """Continue arm `reuse` to step `until`; returns the wall seconds it took (and appends the CPU
    seconds to `cpu`: a process paused by a shared machine's scheduler or a SIGSTOP uses none)."""
    from rtsvc.training.distill import DistillConfig, distill

    out = work / f"student-nfe1-reuse{reuse}"
    started, cpu_started = time.perf_counter(), time.process_time()
    distill(DistillConfig(teacher=str(work / "teacher" / "last.ckpt"), data=str(work / "wavs"), out=str(out),
                          nfe=1, max_steps=until, batch_size=4, pairs=4, lr=1e-3, save_every=chunk,
                          log_every=max(1, chunk // 2), max_frame_len=128, num_workers=0, device="cpu",
                          progress=False, cfg_strength=CFG, teacher_reuse=reuse,
                          resume=(out / "last.ckpt").exists()))
    if cpu is not None:
        cpu.append(time.process_time() - cpu_started)
    return time.perf_counter() - started


def window_rate(work: Path, reuse: int) -> float:
    """Median steps/s of the arm's metrics windows (pure step time, no start-up)."""
    path = work / f"student-nfe1-reuse{reuse}" / "metrics.jsonl"
    rates = [json.loads(line)["steps_per_s"] for line in path.read_text().splitlines()]
    return float(np.median(rates))


def chunk_rates(work: Path, reuse: int, first_step: int, last_step: int) -> float:
    """Median steps/s of the arm's metrics windows ending in (first_step, last_step]."""
    path = work / f"student-nfe1-reuse{reuse}" / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rates = [r["steps_per_s"] for r in rows if first_step < r.get("step", 0) <= last_step]
    return float(np.median(rates)) if rates else float("nan")


def alternate_rounds(work: Path, reuse: int, rounds: int, chunk: int) -> dict:
    """Reuse 1 and reuse `reuse`, strictly alternated, `rounds` chunks each: per round the wall steps/s
    (start-up included), the metrics windows' median (pure step time), steps per CPU second (immune to
    pauses) and their ratios; then the mean and range of each ratio."""
    done = {1: 0, reuse: 0}
    rows = []
    for k in range(rounds):
        row = {"round": k + 1}
        for arm in (1, reuse):
            cpu: list = []
            spent = run_chunk(work, arm, done[arm] + chunk, chunk, cpu)
            row[f"reuse{arm}_steps_per_s"] = chunk / spent
            row[f"reuse{arm}_steps_per_cpu_s"] = chunk / cpu[0]
            row[f"reuse{arm}_window_steps_per_s"] = chunk_rates(work, arm, done[arm], done[arm] + chunk)
            row[f"reuse{arm}_load_1m"] = os.getloadavg()[0]
            done[arm] += chunk
        row["ratio"] = row[f"reuse{reuse}_steps_per_s"] / row["reuse1_steps_per_s"]
        row["window_ratio"] = row[f"reuse{reuse}_window_steps_per_s"] / row["reuse1_window_steps_per_s"]
        row["cpu_ratio"] = row[f"reuse{reuse}_steps_per_cpu_s"] / row["reuse1_steps_per_cpu_s"]
        rows.append(row)
        print(f"round {k + 1}: reuse 1 {row['reuse1_steps_per_s']:.3f} steps/s, reuse {reuse} "
              f"{row[f'reuse{reuse}_steps_per_s']:.3f} (x{row['ratio']:.2f}); windows "
              f"{row['reuse1_window_steps_per_s']:.3f} vs {row[f'reuse{reuse}_window_steps_per_s']:.3f} "
              f"(x{row['window_ratio']:.2f}); per CPU s {row['reuse1_steps_per_cpu_s']:.3f} vs "
              f"{row[f'reuse{reuse}_steps_per_cpu_s']:.3f} (x{row['cpu_ratio']:.2f}); load "
              f"{row[f'reuse{reuse}_load_1m']:.1f}", flush=True)
    summary = {key: {"mean": float(np.mean([r[key] for r in rows])), "min": min(r[key] for r in rows),
                     "max": max(r[key] for r in rows)} for key in ("ratio", "window_ratio", "cpu_ratio")}
    for key, s in summary.items():
        print(f"{key}: mean x{s['mean']:.2f} (range x{s['min']:.2f}-x{s['max']:.2f}) over {rounds} rounds")
    return {"reuse": reuse, "chunk": chunk, "rounds": rows, "summary": summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--reuse", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=600.0, help="wall time per arm")
    ap.add_argument("--teacher-steps", type=int, default=1500)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=CHUNK, help="steps per turn (a multiple of --reuse)")
    ap.add_argument("--rounds", type=int, default=0, help="strict alternation: rounds per arm (needs a "
                    "fresh --work); 0: alternate by wall time until --seconds")
    ap.add_argument("--no-quality", action="store_true", help="skip the quality table")
    args = ap.parse_args()
    if args.chunk % args.reuse:
        ap.error("--chunk must be a multiple of --reuse")
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    make_data(args.work)
    train_teacher(args.work, args.teacher_steps, "cpu")
    if args.rounds:
        if any((args.work / f"student-nfe1-reuse{r}").exists() for r in (1, args.reuse)):
            ap.error("--rounds needs students that start from step 0: remove WORK/student-nfe1-reuse*")
        report = alternate_rounds(args.work, args.reuse, args.rounds, args.chunk)
        if not args.no_quality:
            report["table"] = table(args.work, "cpu")
        (args.work / "rounds.json").write_text(json.dumps(report, indent=1))
        return
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
