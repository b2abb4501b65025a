"""What `rtsvc eval` shows: a rich table, eval.json (every clip's scores and the summary) and eval.png
(metrics per configuration with their spread over clips, and one clip's spectrograms side by side)."""

import json
import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from rtsvc.eval.runner import EvalResult, machine

LIMITS = (
    "similarity: Resemblyzer d-vector cosine to the target's reference clips (trained on read speech: "
    "weaker on singing, whispers, extreme pitch; ~0.75+ is usually the same speaker); "
    "cents/gross/voicing: output F0 vs input F0 + shift, one tracker for all (its own errors count); "
    "DNSMOS: trained on noisy/enhanced speech, not on singing or converted voices; "
    "LSD/mel L1: distance to the reference configuration (level-matched), not to a ground truth; "
    "RTF: wall time / audio on this machine, indicative only when it is shared"
)
# (key, column, format, better) for the table and the picture
COLUMNS = (
    ("similarity", "speaker sim", "{:.3f}", "higher"),
    ("cents", "F0 err cents (median)", "{:.1f}", "lower"),
    ("gross", "F0 >50c", "{:.1%}", "lower"),
    ("voicing", "voicing agree", "{:.1%}", "higher"),
    ("dnsmos", "DNSMOS", "{:.2f}", "higher"),
    ("lsd_db", "LSD dB", "{:.2f}", "lower"),
    ("mel_l1", "mel L1", "{:.3f}", "lower"),
)


def _cell(stat: dict | None, fmt: str) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    text = fmt.format(stat["mean"])
    return text + (f" ±{fmt.format(stat['std']).rstrip('%')}" if stat.get("n", 0) > 1 else "")


def eval_table(result: EvalResult):
    from rich.table import Table

    plan = result.plan
    table = Table(title=f"rtsvc eval: {len(result.clips)} clip(s), reference {plan.reference.label!r}",
                  caption="mean ±std over clips. " + LIMITS)
    for name in ("configuration", "steps", *(c[1] for c in COLUMNS), "RTF", "algo latency ms"):
        table.add_column(name, justify="left" if name == "configuration" else "right")
    for label, summary in result.summary.items():
        latency = summary.get("latency_ms")
        table.add_row(label + (" (reference)" if label == plan.reference.label else ""),
                      str(summary.get("steps", "-")) if label != "input" else "-",
                      *(_cell(summary.get(key), fmt) for key, _, fmt, _ in COLUMNS),
                      f"{summary['rtf']:.3f}" if "rtf" in summary else "-",
                      "offline" if latency is None and label != "input" else
                      ("-" if latency is None else f"{latency:.1f}"))
    return table


def _clean(value):
    """JSON without NaN (null instead) and numpy scalars as plain numbers."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def eval_json(result: EvalResult) -> dict:
    plan = result.plan
    return _clean({
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": None if plan.spec.model is None else str(plan.spec.model),
        "speaker": plan.speaker, "pitch": plan.pitch, "seed": plan.seed, "f0_tracker": plan.eval_f0,
        "reference": plan.reference.label,
        "configs": [{"label": c.label, "text": c.text} for c in [plan.reference] +
                    [c for c in plan.configs if c is not plan.reference]],
        "clips": [{"name": n, "seconds": s} for n, s in zip(result.clips, result.clip_seconds, strict=True)],
        "speaker_reference_clips": result.target_clips,
        "summary": result.summary,
        "per_clip": result.per_clip,
        "machine": machine(),
        "limits": LIMITS,
        "notes": result.notes,
    })


def write_json(result: EvalResult, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(eval_json(result), indent=2) + "\n")
    return path


def write_png(result: EvalResult, path: Path, clip: int = 0) -> Path:
    """Bars of each metric per configuration (error bars: std over clips), then the spectrograms
    of clip `clip`: the input and every configuration, on one colour scale."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    from rtsvc.dsp.mel import log_mel_spectrogram

    labels = list(result.outputs)
    metrics = [c for c in COLUMNS if any((result.summary[lab].get(c[0]) or {}).get("mean") is not None
                                         for lab in labels)]
    metrics.append(("rtf", "RTF (compute / audio)", "{:.3f}", "lower"))
    panels = ["input", *labels]
    cols = max(len(metrics), 1)
    fig = plt.figure(figsize=(max(3.2 * cols, 2.6 * len(panels)), 8.5), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1, 1.1])
    axes = np.atleast_1d(top.subplots(1, cols))
    colours = plt.get_cmap("tab10")(np.arange(len(labels)) % 10)
    for ax, (key, name, _, better) in zip(axes, metrics, strict=False):
        means, stds = [], []
        for lab in labels:
            value = result.summary[lab].get(key)
            if isinstance(value, dict):
                means.append(np.nan if value["mean"] is None else value["mean"])
                stds.append(0.0 if value["std"] is None else value["std"])
            else:
                means.append(np.nan if value is None else value)
                stds.append(0.0)
        x = np.arange(len(labels))
        ax.bar(x, means, yerr=stds, color=colours, capsize=3)
        ax.set_title(f"{name}\n({better} is better)", fontsize=9)
        ax.set_xticks(x, [str(i + 1) for i in x], fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
    top.suptitle("configurations: " + "   ".join(f"{i + 1} = {lab}" for i, lab in enumerate(labels)),
                 fontsize=9)
    mels = [log_mel_spectrogram(result.inputs[clip])[0].numpy()] + \
        [log_mel_spectrogram(result.outputs[lab][clip])[0].numpy() for lab in labels]
    low = min(float(np.percentile(m, 5)) for m in mels)
    high = max(float(m.max()) for m in mels)
    spec_axes = np.atleast_1d(bottom.subplots(1, len(panels), sharey=True))
    seconds = result.clip_seconds[clip]
    for i, (ax, mel, title) in enumerate(zip(spec_axes, mels, panels, strict=True)):
        ax.imshow(mel, origin="lower", aspect="auto", vmin=low, vmax=high, cmap="magma",
                  extent=(0, seconds, 0, mel.shape[0]))
        ax.set_title(title if i == 0 else f"{i}: {title}", fontsize=8)
        ax.set_xlabel("s", fontsize=8)
        ax.tick_params(labelsize=7)
    spec_axes[0].set_ylabel("mel band", fontsize=8)
    bottom.suptitle(f"log-mel spectrograms of {result.clips[clip]}", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def print_report(result: EvalResult, out: Path, say) -> None:
    """The table on stdout (wide enough when piped), notes, then OUT/eval.json and OUT/eval.png."""
    import sys

    from rich.console import Console
    from rich.text import Text

    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(eval_table(result))
    for note in result.notes:
        console.print(Text.assemble(("note", "yellow"), f" {note}"), highlight=False)
    written = write_json(result, out / "eval.json"), write_png(result, out / "eval.png")
    say(f"wrote {written[0]}, {written[1]} and the converted clips under {out / 'audio'}")
