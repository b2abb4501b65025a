"""Feature requests: how a stream's feature computation is split from the networks that serve it.

A streaming `FeatureCache` computes through a generator (`FeatureCache.window_steps`) that yields
one `FeatureRequest` at a time (F0, ContentVec or Whisper of a 16 kHz segment) and is sent back its
result. `drive` serves one generator with one network call per request (the single-stream path);
`drive_lockstep` serves many streams' generators together: each round it gathers every pending
request, groups them by `FeatureRequest.key` (kind and segment length) and runs each group as one
batched call (`compute_batch`). Segments of different lengths are never padded into one call (the
encoders' normalisations and convolutions would see the padding): they form their own groups.
"""

from collections.abc import Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from rtsvc.features.extractor import FeatureExtractor
    from rtsvc.features.overlap import SideThread

FEATURE_KINDS = ("f0", "contentvec", "whisper")


@dataclass
class FeatureRequest:
    """One network call a stream needs: `kind` of the 16 kHz `audio`; Whisper's position embeddings
    start at `position_offset` (encoder frames: where the segment sits in its stream)."""

    kind: str
    audio: np.ndarray  # float32 [samples] at 16 kHz
    position_offset: int = 0

    @property
    def key(self) -> tuple[str, int]:
        """Requests with equal keys run as one batched call."""
        return self.kind, len(self.audio)


FeatureSteps = Generator[FeatureRequest, Any, Any]


def compute_one(features: "FeatureExtractor", request: FeatureRequest):
    """The result of one request: f0 Hz np.ndarray [len // 160 + 1], or encoder frames [frames, d]
    float32 on `features.device`. The encoders' single-item calls: the one-at-a-time path as it was."""
    if request.kind == "f0":
        return features.f0_extractor(request.audio)
    if request.kind == "contentvec":
        return features.contentvec.hidden(request.audio).to(features.device)
    if request.kind == "whisper" and features.whisper_encoder is not None:
        return features.whisper_encoder.hidden(request.audio, pad_to_30s=False,
                                               position_offset=request.position_offset).to(features.device)
    raise ValueError(f"cannot compute a {request.kind!r} feature request with these features")


def compute_batch(features: "FeatureExtractor", requests: list[FeatureRequest]) -> list:
    """Results of requests of one kind (one batched network call per segment length)."""
    kinds = {r.kind for r in requests}
    if len(kinds) != 1 or not kinds <= set(FEATURE_KINDS):
        raise ValueError(f"one feature kind per batch, got {sorted(kinds)}")
    kind = kinds.pop()
    if len(requests) == 1:
        return [compute_one(features, requests[0])]
    audios = [r.audio for r in requests]
    if kind == "f0":
        return features.f0_extractor.batch(audios)
    if kind == "contentvec":
        return [h.to(features.device) for h in features.contentvec.hidden_batch(audios)]
    if features.whisper_encoder is None:
        raise ValueError("a Whisper request for features without a Whisper encoder (V3)")
    offsets = [r.position_offset for r in requests]
    return [h.to(features.device) for h in features.whisper_encoder.hidden_batch(audios, offsets)]


@torch.inference_mode()
def drive(features: "FeatureExtractor", steps: FeatureSteps, side: "SideThread | None" = None):
    """Run one generator to its end, one network call per request; its return value. With `side`,
    F0 requests are answered with a Future computed on that thread while the next requests run
    (`rtsvc.features.overlap`)."""
    try:
        request = next(steps)
        while True:
            if side is not None and request.kind == "f0":
                answer = side.submit(lambda r=request: compute_one(features, r))
            else:
                answer = compute_one(features, request)
            request = steps.send(answer)
    except StopIteration as stop:
        return stop.value


@torch.inference_mode()
def drive_lockstep(features: "FeatureExtractor", steps: list[FeatureSteps]) -> list:
    """Run many generators together with batched network calls; their return values in order.

    A generator that raises gets its exception in its place in the list (the others go on); a
    failing batched call fails the generators whose requests were in it.
    """
    results: list = [None] * len(steps)
    pending: dict[int, FeatureRequest] = {}
    for i, gen in enumerate(steps):
        _advance(gen, i, None, pending, results, first=True)
    while pending:
        groups: dict[tuple, list[int]] = {}
        for i, request in pending.items():
            groups.setdefault(request.key, []).append(i)
        answers: dict[int, Any] = {}
        failed: dict[int, BaseException] = {}
        for rows in groups.values():
            try:
                for i, out in zip(rows, compute_batch(features, [pending[i] for i in rows]), strict=True):
                    answers[i] = out
            except Exception as err:  # noqa: BLE001 - the group's streams fail, the rest go on
                failed.update(dict.fromkeys(rows, err))
        current, pending = pending, {}
        for i in current:
            if i in failed:
                steps[i].close()
                results[i] = failed[i]
            else:
                _advance(steps[i], i, answers[i], pending, results)
    return results


def _advance(gen: FeatureSteps, i: int, answer, pending: dict, results: list, first: bool = False) -> None:
    try:
        pending[i] = next(gen) if first else gen.send(answer)
    except StopIteration as stop:
        results[i] = stop.value
    except Exception as err:  # noqa: BLE001 - returned in the stream's place
        results[i] = err


__all__ = ["FEATURE_KINDS", "FeatureRequest", "FeatureSteps", "compute_batch", "compute_one", "drive",
           "drive_lockstep"]
