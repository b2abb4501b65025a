"""Many streams' model-voice blocks as one batch per stage (what `rtsvc serve --max-batch` runs).

A streaming `ModelVoice.convert` is two halves: `prepare` (per stream: the feature cache, F0 shift,
crops -> a `BlockJob`) and the shared networks (DiT sampling, then the vocoder). `run_blocks` runs
both for whole blocks of many streams at once (`run_jobs` is the second half):

    features       each stream's own cache, driven in lockstep (`ModelVoice.prepare_steps` under
                   `rtsvc.features.requests.drive_lockstep`): the F0, ContentVec and Whisper
                   segments of one length run as one batched call each (per item its Whisper
                   position offset); RMS, resampling and the caches' bookkeeping stay per stream
    DiT sampling   stacked: every Euler step and every guidance pass in one backend call per step
                   (`guided_velocity`), per item its speaker, F0/RMS/content and start noise (drawn
                   by the item's absolute frame index and seed, exactly as alone)
    vocoder        stacked: per item its harmonic phases and source noise (tied to its samples)
    SOLA           per stream, in the engine, as before

Jobs share a DiT call when their DiT frames, steps and guidance settings (`Guidance`: V2's Whisper
CFG; V3's ds / speaker / skip strengths, skip layers, rescale) agree, and a vocoder call when their
vocoded frames agree: grouped, not padded. The DiT's depthwise convolutions read across a padded
end even with an attention key mask, so padding would change the frames (docs/deploy.md has the
measurement). Streams of one server share one block layout; streams with different guidance
settings form separate DiT groups. V3's guidance rescale divides by the std of the whole batch (as
upstream), so V3 blocks with rescale on run one per DiT call (their vocoder still batches). Within
a group each item equals its one-at-a-time result to float tolerance.

Offline slices of different lengths (`convert --batch-size`) are the exception: `run_padded` pads
them into one DiT batch with every item computed alone (`Conditioning.items_alone`: padded frames
zeroed before each depthwise conv, V3's rescale std per item), and vocodes them one by one.
"""

import time
from collections.abc import Hashable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from rtsvc.dsp.formant_warp import warp_formants
from rtsvc.dsp.mel import denormalize_mel
from rtsvc.features.requests import drive_lockstep
from rtsvc.models.families import Family, family_named
from rtsvc.models.flow import Conditioning, frame_noise, sample_on_grid
from rtsvc.settings import Knobs
from rtsvc.voices.model import (
    BlockJob,
    ModelVoice,
    guidance_of,
    sample_group,
    sampling_grid,
    stack,
    vocode_group,
)

if TYPE_CHECKING:
    from rtsvc.backends.base import Backend


class Batcher(Protocol):
    """Where a `BatchedVoice` sends its blocks (`rtsvc.serve.scheduler.DeadlineBatcher` running
    `run_blocks`): `submit` blocks until the block's audio is back, due by `due` (time.monotonic)."""

    def submit(self, job: "Block", due: float, stream: Hashable | None = None) -> np.ndarray: ...


def dit_key(job: BlockJob, family: Family, index: int) -> tuple:
    """What must agree for jobs to share one DiT sampling: frames, steps, guidance (and, where the
    family's guidance mixes the batch, e.g. V3's rescale, the job itself)."""
    guidance = guidance_of(job.knobs)
    return (job.cond.f0.shape[1], job.knobs.steps, job.knobs.schedule, guidance,
            index if family.batch_wide(guidance) else -1)


def vocoder_key(job: BlockJob) -> int:
    return job.f0.shape[1] - job.first  # vocoded frames


def groups(keys: list) -> list[list[int]]:
    """Indices with equal keys, in first-seen order."""
    found: dict = {}
    for i, key in enumerate(keys):
        found.setdefault(key, []).append(i)
    return list(found.values())


@torch.inference_mode()
def run_jobs(backend: "Backend", jobs: list[BlockJob]) -> list[np.ndarray]:
    """Every job's audio, as `ModelVoice.convert` returns it, with jobs batched per stage."""
    family = family_named(backend.family)
    mels: list[torch.Tensor | None] = [None] * len(jobs)
    for rows in groups([dit_key(j, family, i) for i, j in enumerate(jobs)]):
        for i, mel in zip(rows, sample_group(backend, [jobs[i] for i in rows]), strict=True):
            mels[i] = mel
    out: list[np.ndarray | None] = [None] * len(jobs)
    for rows in groups([vocoder_key(j) for j in jobs]):
        audio = vocode_group(backend, [jobs[i] for i in rows], [mels[i] for i in rows])
        for i, a in zip(rows, audio, strict=True):
            out[i] = a
    return out


@dataclass
class Block:
    """One stream's whole block for a batch: its window, knobs, position and tail (as `convert`
    takes them) and the stream's own `ModelVoice` (its feature cache)."""

    voice: ModelVoice
    audio: np.ndarray
    knobs: Knobs
    start_sample: int = 0
    tail: int | None = None


def run_blocks(blocks: list[Block]) -> list:
    """Every block's audio as its voice's `convert` returns it, all stages batched: the blocks'
    `prepare_steps` in lockstep with batched F0 / ContentVec / Whisper calls, then `run_jobs` for the
    DiT and the vocoder. A block whose preparation fails gets its exception in its place (the
    others go on); a failing DiT or vocoder batch raises for all."""
    out: list = [None] * len(blocks)
    jobs: dict[int, BlockJob] = {}
    for rows in groups([id(b.voice.features) for b in blocks]):  # blocks of one server share them
        steps = [blocks[i].voice.prepare_steps(blocks[i].audio, blocks[i].knobs, blocks[i].start_sample,
                                               blocks[i].tail) for i in rows]
        for i, job in zip(rows, drive_lockstep(blocks[rows[0]].voice.features, steps), strict=True):
            if isinstance(job, BlockJob):
                jobs[i] = job
            else:  # nothing to convert, or the block's own error
                out[i] = np.zeros(0, dtype=np.float32) if job is None else job
    order = list(jobs)
    for rows in groups([id(blocks[i].voice.backend) for i in order]):
        audio = run_jobs(blocks[order[rows[0]]].voice.backend, [jobs[order[k]] for k in rows])
        for k, a in zip(rows, audio, strict=True):
            out[order[k]] = a
    return out


class BatchedVoice:
    """One stream's `Voice` whose whole blocks run in batches shared with other streams.

    `voice` is this stream's own streaming `ModelVoice` (its feature cache). `convert` submits the
    whole block to `batcher` (features, DiT and vocoder all run there, batched with the other
    streams' blocks by `run_blocks`) and blocks until its audio is back. `due` is when the
    block's real-time budget (`budget_s` after the call started) runs out; the batcher learns this
    stream's arrival rhythm from its key (this object).
    """

    def __init__(self, voice: ModelVoice, batcher: Batcher, budget_s: float):
        if voice.cache is None:
            raise ValueError("a batched voice must be a streaming ModelVoice (voice.for_streaming())")
        self.voice = voice
        self.batcher = batcher
        self.budget_s = budget_s
        self.sample_rate = voice.sample_rate
        self.speakers = voice.speakers
        self.stream_defaults = voice.stream_defaults

    def convert(self, audio: np.ndarray, knobs: Knobs, start_sample: int = 0,
                tail: int | None = None) -> np.ndarray:
        due = time.monotonic() + self.budget_s
        return self.batcher.submit(Block(self.voice, audio, knobs, start_sample, tail), due, stream=self)

    def reset(self) -> None:
        self.voice.reset()

    @property
    def auto_pitch(self) -> float | None:
        """The stream's auto-pitch shift in semitones (None: fixed pitch)."""
        return self.voice.auto_pitch


__all__ = ["Batcher", "BatchedVoice", "Block", "dit_key", "run_blocks", "run_jobs", "sample_group", "stack",
           "vocode_group", "vocoder_key"]


# --- offline slices of different lengths: padded (upstream's --batch-size) ----------------------

def _padded(cond: Conditioning, n: int) -> Conditioning:
    """`cond` [1, k, ...] zero-padded to n frames, with its frame mask, each item computed alone."""
    k = cond.f0.shape[1]
    pad = lambda t: None if t is None else torch.nn.functional.pad(  # noqa: E731 - frames are dim 1
        t, (0, 0) * (t.dim() - 2) + (0, n - k))
    mask = (torch.arange(n, device=cond.f0.device) < k)[None]
    return replace(cond, f0=pad(cond.f0), rms=pad(cond.rms), cvec=pad(cond.cvec), whisper=pad(cond.whisper),
                   bad_cvec=pad(cond.bad_cvec), mask=mask, items_alone=True)


def run_padded(backend: "Backend", jobs: list[BlockJob]) -> list[np.ndarray]:
    """Whole offline slices (`ModelVoice.prepare` of each, any lengths) as one padded DiT batch, then
    vocoded one by one: each job's samples as `run_jobs([job])` gives them, to float tolerance. The
    padded frames are masked from attention, zeroed before every depthwise conv and left out of V3's
    rescale std (`Conditioning.items_alone`), so nothing of one slice reaches another. A teacher on
    the torch backend only (a student's or an ONNX graph's velocity takes no per-item mask)."""
    if len(jobs) == 1:
        return run_jobs(backend, jobs)
    guidance = guidance_of(jobs[0].knobs)
    prepare = family_named(backend.family).prepare_condition
    lengths = [j.cond.f0.shape[1] for j in jobs]
    n = max(lengths)
    cond = stack([_padded(prepare(j.cond, guidance), n) for j in jobs])
    noise = torch.stack([frame_noise(j.noise_frame, n, j.knobs.seed) for j in jobs]).to(backend.device)
    velocity = lambda x, t, dt: backend.step_velocity(x, t, dt, cond, guidance)  # noqa: E731
    x = sample_on_grid(velocity, noise, sampling_grid(backend, jobs[0].knobs))
    mel = denormalize_mel(x).transpose(1, 2)  # [b, 128, n]
    return [vocode_group(backend, [j], [warp_formants(mel[i:i + 1, :, :k], j.knobs.formant_shift)])[0]
            for i, (j, k) in enumerate(zip(jobs, lengths, strict=True))]
