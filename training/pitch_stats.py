"""Each speaker's pitch statistics from a prepared dataset, for auto pitch (rtsvc.voices.auto_pitch).

`rtsvc prepare` writes them into metadata.json (`pitch_stats`: speaker -> median and spread of log-F0
over voiced frames, from the cached clips' F0); `rtsvc train` copies them into the checkpoint
(hyper_parameters.cfg.pitch_stats), keeping a base checkpoint's statistics for speakers it does not
retrain; `rtsvc export` copies those into the bundle's manifest.
"""

from pathlib import Path

import torch

from rtsvc.voices.auto_pitch import pitch_stats


def dataset_pitch_stats(cache: Path, clips: list[dict]) -> dict[str, dict]:
    """Speaker -> statistics over the F0 of its cached clips (`clips`: metadata rows with "speaker"
    and "file" relative to `cache`); speakers with no voiced frame are left out."""
    tracks: dict[str, list] = {}
    for clip in clips:
        f0 = torch.load(cache / clip["file"], map_location="cpu", weights_only=True)["f0"]
        tracks.setdefault(clip["speaker"], []).append(f0.float().numpy())
    found = {speaker: pitch_stats(f0s) for speaker, f0s in sorted(tracks.items())}
    return {speaker: stats for speaker, stats in found.items() if stats is not None}


def checkpoint_pitch_stats(meta: dict, base: dict | None, speakers: dict[str, int]) -> dict[str, dict]:
    """The statistics a trained checkpoint carries: the dataset's, over the base checkpoint's for the
    speakers the dataset does not hold; only speakers the model has."""
    merged = {**(base or {}), **meta.get("pitch_stats", {})}
    return {name: stats for name, stats in merged.items() if name in speakers}
