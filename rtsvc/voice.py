"""What the streaming engine and `convert` need from a voice (a model or the DSP voice)."""

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from rtsvc.settings import Knobs


@dataclass(frozen=True)
class StreamDefaults:
    """What a voice streams with unless told otherwise (ms): `--block-ms auto` searches from
    `block_ms`; `jitter_ms` is the least silence primed into live's output buffer. The values:
    rtsvc/voices/defaults.py."""

    block_ms: float
    crossfade_ms: float
    sola_search_ms: float
    jitter_ms: float


class Voice(Protocol):
    """Converts mono float32 audio at `sample_rate` (44.1 kHz) into the target voice.

    `start_sample` is the absolute stream position of `audio[0]`: voices tie their randomness
    (rectified-flow noise, vocoder noise) and caches to it, so overlapping windows agree.
    `tail`: only the last `tail` output samples are needed (a voice may skip work on the rest);
    the return value then has exactly `tail` samples, else `len(audio)`.
    """

    sample_rate: int
    speakers: list[str]
    stream_defaults: StreamDefaults  # block (where `--block-ms auto` starts), crossfade, search, jitter

    def convert(self, audio: np.ndarray, knobs: Knobs, start_sample: int = 0,
                tail: int | None = None) -> np.ndarray: ...

    def reset(self) -> None:
        """Forget cached features (a new stream starts)."""
