"""Incremental conditioning features for one stream (what a streaming `ModelVoice` keeps per session).

The streaming engine hands the voice overlapping windows `[left context | new block]` that slide by
one block. Recomputing every feature over the whole window each block wastes most of the work, so
`FeatureCache` keeps per-frame results keyed by their position in the stream and computes only what
the new samples change:

    RMS        frames whose 2048-sample frame reaches past the previous end (1280 samples): ~block
    F0         the extractor runs on [previous end - 2 margins, end]; frames from (previous end - margin)
               on are replaced; older frames are kept
    encoders   ContentVec and Whisper run on [previous end - encoder context, end], never more than
               the window (Whisper without the 30 s padding, positions where the segment sits in the
               stream); older frames of the DiT window come from the cache, computed when they were
               the newest

Positions are counted from `origin`, the first sample of the stream (or of the window that broke
continuity). Grids, all whole samples at 44.1 kHz: mel frames every 512, F0 frames every 441 (10 ms
= 160 samples at 16 kHz), encoder frames every 882 (20 ms = 320). Every 16 kHz segment starts on an
F0 or encoder frame, so the frames of different segments share one absolute grid. Each extractor
hears the resampler the offline path gives it: F0 the sinc resampler upstream's RMVPE uses
(`rtsvc.dsp.sinc`, width 128: 441 input samples to 160, so a segment on the F0 grid equals the whole
stream's inside it), the encoders the family's (`FeatureExtractor.encoder_16k`: soxr, whose output
inside a segment equals the whole stream's to 6e-7, or the V2 release's sinc at width 6); their edge
transients (sinc 128: 357 input samples; soxr: < 200 at 16 kHz) stay inside the margins.

Exactness: RMS equals `rms_per_frame` over the whole stream so far (tested to 1e-6). F0 does for an
extractor whose receptive field fits in `f0_margin_frames` (tested with a local autocorrelation
tracker); WORLD's dio agrees to 1e-7 (measured); RMVPE's BiGRU sees its whole input, so its kept
frames can differ from recomputed ones. Reused encoder frames are an approximation by design (they lacked
the right context they would get now): `encoder_context_s=None` turns reuse off (encoders on the
whole window each block), which is what the exactness tests compare against.

A window that does not continue the previous one (not on the 512 grid, earlier, a gap, or different
samples in the overlap) restarts the cache from that window: results are never mixed across streams.
"""

import time
from concurrent.futures import Future

import numpy as np
import torch
import torch.nn.functional as F

from rtsvc.dsp.audio import ENCODER_SAMPLE_RATE, HOP_LENGTH, N_FFT, SAMPLE_RATE
from rtsvc.dsp.sinc import sinc_resample
from rtsvc.features.f0 import f0_to_mel_frames
from rtsvc.features.frames import mel_frame_count
from rtsvc.features.overlap import SideThread
from rtsvc.features.requests import FeatureRequest, FeatureSteps, drive

F0_HOP = 441  # samples at 44.1 kHz per F0 frame (10 ms; 160 at 16 kHz)
ENC_HOP = 882  # samples at 44.1 kHz per encoder frame (20 ms; 320 at 16 kHz)
RMS_PAD = (N_FFT - HOP_LENGTH) // 2  # 768: a mel frame's RMS reads [k*512 - 768, k*512 + 1280)
RMS_REACH = N_FFT - RMS_PAD  # 1280 samples right of a frame's start
F0_MARGIN_FRAMES = 15  # 150 ms each side of the recomputed frames (dio: kept frames agree to 1e-7)
ENCODER_CONTEXT_S = 1.0  # left context the encoders see before the new samples
RESAMPLE_EDGE = 2 * F0_HOP  # soxr HQ's edge transient is < 200 samples at 16 kHz (12 ms): 20 ms spare
ENCODER_EDGE_FRAMES = 5  # the first 100 ms of an encoder segment lack left context: keep cached ones


class FrameStore:
    """Rows indexed by absolute frame number, held for a sliding range [first, first + len)."""

    def __init__(self):
        self.first = 0
        self.rows: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.rows is None else int(self.rows.shape[0])

    @property
    def end(self) -> int:
        return self.first + len(self)

    @property
    def nbytes(self) -> int:
        return 0 if self.rows is None else self.rows.element_size() * self.rows.nelement()

    def clear(self) -> None:
        self.first, self.rows = 0, None

    def write(self, start: int, rows: torch.Tensor, keep_before: int | None = None) -> None:
        """Put rows at frames start, start + 1, ...; frames before `keep_before` that are already
        held keep their value (they were computed with more left context)."""
        if rows.shape[0] == 0:
            return
        stop = start + rows.shape[0]
        if self.rows is None or start > self.end or stop < self.first:  # nothing to merge with
            self.first, self.rows = start, rows.clone()
            return
        lo, hi = min(self.first, start), max(self.end, stop)
        merged = rows.new_zeros((hi - lo, *rows.shape[1:]))
        merged[self.first - lo: self.end - lo] = self.rows
        frames = torch.arange(start, stop)
        fresh = torch.ones(rows.shape[0], dtype=torch.bool)
        if keep_before is not None:
            fresh = (frames >= keep_before) | (frames < self.first) | (frames >= self.end)
        merged[(frames - lo)[fresh]] = rows[fresh]
        self.first, self.rows = lo, merged

    def gather(self, index: np.ndarray) -> torch.Tensor:
        """Rows at frame numbers `index`, clamped to the held range (edges held)."""
        idx = np.clip(index - self.first, 0, len(self) - 1)
        return self.rows[torch.from_numpy(idx.astype(np.int64))]

    def trim(self, before: int) -> None:
        """Forget frames before `before` (a window never looks back past its own start)."""
        if self.rows is not None and before > self.first:
            drop = min(before - self.first, len(self))
            self.rows, self.first = self.rows[drop:], self.first + drop


class FeatureCache:
    """Per-stream features of `features` (a `rtsvc.features.FeatureExtractor`) for sliding windows.

    `window(audio, start_sample)` (or the generator `window_steps`) -> (f0 Hz unshifted [n], rms [n],
    cvec [n, 768], whisper [n, 1280] or None when `features` has no Whisper encoder (V3)),
    n = len // 512 mel frames (`mel_frame_count`, the offline grid), on `features.device`. `last_ms`
    holds the last call's time per part
    (with `concurrent_f0`, F0 and the encoders overlap in time, so their times add up to more).

    `concurrent_f0`: `window` computes F0 on a side thread while the encoders run
    (`rtsvc.features.overlap`); the same results, in about the longer of the two where a core is free.
    """

    def __init__(self, features, encoder_context_s: float | None = ENCODER_CONTEXT_S,
                 f0_margin_frames: int = F0_MARGIN_FRAMES, concurrent_f0: bool = False):
        self.features = features
        self.side_thread = SideThread() if concurrent_f0 else None
        self._pending_f0: list[tuple] = []  # (future, first frame, replace from): F0 computing beside
        self.encoder_context = None if encoder_context_s is None else int(encoder_context_s * SAMPLE_RATE)
        self.margin = int(f0_margin_frames)
        self.f0, self.rms, self.cvec, self.whisper = FrameStore(), FrameStore(), FrameStore(), FrameStore()
        self.last_ms: dict[str, float] = {}
        self.reset()

    def reset(self) -> None:
        for store in (self.f0, self.rms, self.cvec, self.whisper):
            store.clear()
        self.origin = 0
        self._prev_start: int | None = None  # relative to origin
        self._prev_audio = np.zeros(0, dtype=np.float32)
        self.cold_starts = 0

    @property
    def nbytes(self) -> int:
        """Memory held for this stream (feature rows and the previous window)."""
        return sum(s.nbytes for s in (self.f0, self.rms, self.cvec, self.whisper)) + self._prev_audio.nbytes

    # --- the public calls ---------------------------------------------------------------------
    def window(self, audio: np.ndarray, start_sample: int):
        """The window's features, one network call per request (see `window_steps`)."""
        return drive(self.features, self.window_steps(audio, start_sample), self.side_thread)

    def window_steps(self, audio: np.ndarray, start_sample: int) -> FeatureSteps:
        """`window` as a generator: yields each `FeatureRequest` the window needs (F0, then ContentVec,
        then Whisper of a 16 kHz segment), is sent its result, and returns `window`'s tuple. Many
        streams' generators run together with batched calls (`rtsvc.features.requests.drive_lockstep`);
        the drivers advance it under `torch.inference_mode`."""
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        self.last_ms = dict.fromkeys(("resample", "f0", "rms", "contentvec", "whisper"), 0.0)
        self._pending_f0.clear()  # a window that raised may have left one: its stores restart anyway
        if self._continues(audio, start_sample):
            yield from self._update(audio, start_sample - self.origin)
        else:
            yield from self._cold(audio, start_sample)
        for future, first_frame, replace_from in self._pending_f0:  # F0 computed beside the encoders
            raw, ms = future.result()
            self._write_f0(raw, first_frame, replace_from)
            self.last_ms["f0"] += ms
        self._pending_f0.clear()
        return self._on_window(audio, start_sample)

    def _on_window(self, audio: np.ndarray, start_sample: int):
        """The window's frames from the stores (all computed by now); forget what no later window needs."""
        n = mel_frame_count(len(audio))
        s = start_sample - self.origin
        k0 = s // HOP_LENGTH
        whisper = self._enc_on_mel(self.whisper, k0, n) if self.features.whisper_encoder is not None else None
        out = self._f0_on_mel(k0, n, s, s + len(audio)), self._rms_on_mel(k0, n), \
            self._enc_on_mel(self.cvec, k0, n, self.features.content_resize), whisper
        aligned = s % HOP_LENGTH == 0 and len(audio) % HOP_LENGTH == 0
        self._prev_start, self._prev_audio = (s, audio.copy()) if aligned else (None, audio[:0])
        self.f0.trim(s // F0_HOP - 1)
        self.rms.trim(k0)
        self.cvec.trim(k0 * HOP_LENGTH // ENC_HOP - 1)
        self.whisper.trim(k0 * HOP_LENGTH // ENC_HOP - 1)
        return out

    # --- continuity -----------------------------------------------------------------------------
    def _continues(self, audio: np.ndarray, start_sample: int) -> bool:
        if self._prev_start is None:
            return False
        s, ps = start_sample - self.origin, self._prev_start
        pe = ps + len(self._prev_audio)
        if s % HOP_LENGTH or len(audio) % HOP_LENGTH or not ps <= s <= pe or s + len(audio) < pe:
            return False
        # the overlap must hold the same samples, else this is another stream
        return np.array_equal(audio[: pe - s], self._prev_audio[s - ps:])

    def _cold(self, audio: np.ndarray, start_sample: int) -> None:
        """Everything from this window alone; the stream's positions now count from its start."""
        for store in (self.f0, self.rms, self.cvec, self.whisper):
            store.clear()
        self.origin = start_sample
        self.cold_starts += 1
        n = mel_frame_count(len(audio))
        padded = audio[:n * HOP_LENGTH]  # (engine windows are whole frames; a partial one gets no frame)
        started = time.perf_counter()
        self.rms.write(0, _rms(padded, left_reflect=True))
        self._lap("rms", started)
        yield from self._f0_segment(self._resample(padded, for_f0=True), 0, None)
        yield from self._encoders(self._resample(padded), 0, None)

    def _update(self, audio: np.ndarray, s: int) -> None:
        ps = self._prev_start
        pe = ps + len(self._prev_audio)
        e = s + len(audio)
        if e == pe:
            return  # the same window again: everything is cached
            yield  # (a generator all the same)
        src = np.concatenate((self._prev_audio, audio[pe - s:]))  # samples [ps, e)
        started = time.perf_counter()
        k = max((pe - RMS_REACH) // HOP_LENGTH + 1, 0)  # first frame that reads past the old end
        a = k * HOP_LENGTH - RMS_PAD
        if a >= ps:
            self.rms.write(k, _rms(src[a - ps:], left_reflect=False))
        else:  # a window too short to hold one RMS frame's left half: reflect, as a cold window does
            k = ps // HOP_LENGTH
            self.rms.write(k, _rms(src[k * HOP_LENGTH - ps:], left_reflect=True))
        self._lap("rms", started)
        # one 16 kHz segment for F0 and encoders, starting on the encoder grid
        f0_first = max(pe // F0_HOP - self.margin, 0)  # first F0 frame to replace
        f0_a = max((f0_first - self.margin) * F0_HOP, _ceil_to(ps, F0_HOP))
        enc_a = _ceil_to(s, ENC_HOP)  # never more than the window
        if self.encoder_context is not None:
            enc_a = max(enc_a, (pe - self.encoder_context) // ENC_HOP * ENC_HOP)
        # each resampled on the F0 grid (so the 16 kHz samples sit on the stream's grid), started
        # early enough that the resampler's edge transient never reaches an extractor's input
        seg_a = max(f0_a - RESAMPLE_EDGE, _ceil_to(ps, F0_HOP))
        seg_16k = self._resample(src[seg_a - ps:], for_f0=True)
        yield from self._f0_segment(seg_16k[_to_16k(f0_a - seg_a):], f0_a // F0_HOP, f0_first)
        seg_a = max(enc_a - RESAMPLE_EDGE, _ceil_to(ps, F0_HOP))
        seg_16k = self._resample(src[seg_a - ps:])
        yield from self._encoders(seg_16k[_to_16k(enc_a - seg_a):], enc_a // ENC_HOP,
                                  None if self.encoder_context is None
                                  else enc_a // ENC_HOP + ENCODER_EDGE_FRAMES)

    # --- the extractors --------------------------------------------------------------------------
    def _resample(self, audio_44k: np.ndarray, for_f0: bool = False) -> np.ndarray:
        """16 kHz as the offline path makes it: F0's sinc (width 128), or the encoders' resampler."""
        started = time.perf_counter()
        if for_f0:
            out = sinc_resample(audio_44k, SAMPLE_RATE, ENCODER_SAMPLE_RATE)
        else:
            out = self.features.encoder_16k(audio_44k)
        self._lap("resample", started)
        return out

    def _ask(self, request: FeatureRequest):
        """Yield a request and time until its result comes back (batched: the batch's time)."""
        started = time.perf_counter()
        result = yield request
        self._lap(request.kind, started)
        return result

    def _f0_segment(self, audio_16k: np.ndarray, first_frame: int, replace_from: int | None) -> FeatureSteps:
        raw = yield from self._ask(FeatureRequest("f0", audio_16k))
        if isinstance(raw, Future):  # computing beside the encoders: written when the window is assembled
            self._pending_f0.append((raw, first_frame, replace_from))
        else:
            self._write_f0(raw, first_frame, replace_from)

    def _write_f0(self, raw, first_frame: int, replace_from: int | None) -> None:
        rows = torch.from_numpy(np.asarray(raw, dtype=np.float32))
        if replace_from is None:
            self.f0.write(first_frame, rows)
        else:
            skip = max(0, replace_from - first_frame)
            self.f0.write(first_frame + skip, rows[skip:])

    def _encoders(self, audio_16k: np.ndarray, first_frame: int, keep_before: int | None) -> FeatureSteps:
        """ContentVec and Whisper of one segment; `keep_before=None`: the window's frames are all fresh."""
        computed = [(self.cvec, (yield from self._ask(FeatureRequest("contentvec", audio_16k))))]
        if self.features.whisper_encoder is not None:  # V3 models have no Whisper
            whisper = yield from self._ask(FeatureRequest("whisper", audio_16k, first_frame))
            computed.append((self.whisper, whisper))
        for store, rows in computed:
            if keep_before is None:
                store.clear()
            store.write(first_frame, rows.float(), keep_before=keep_before)

    # --- on the window's mel frames ----------------------------------------------------------------
    def _rms_on_mel(self, k0: int, n: int) -> torch.Tensor:
        return self.rms.gather(np.arange(k0, k0 + n)).to(self.features.device)

    def _enc_on_mel(self, store: FrameStore, k0: int, n: int, mode: str = "nearest") -> torch.Tensor:
        # V2's "nearest" resize on a window is frame floor(k * frames / n), i.e. the encoder frame at
        # the mel frame's time: the same rule on the stream's grid keeps every frame's choice fixed.
        # V3's "linear" (align_corners) resize puts mel frame k at encoder position ~k * frames / n:
        # on the stream's grid, the linear blend of the two encoder frames around the mel frame's time
        if mode == "nearest":
            return store.gather(np.arange(k0, k0 + n) * HOP_LENGTH // ENC_HOP)
        pos = np.arange(k0, k0 + n) * (HOP_LENGTH / ENC_HOP)
        lo = np.floor(pos).astype(np.int64)
        weight = torch.from_numpy((pos - lo).astype(np.float32))[:, None].to(store.rows.device)
        return torch.lerp(store.gather(lo), store.gather(lo + 1), weight)

    def _f0_on_mel(self, k0: int, n: int, s: int, e: int) -> torch.Tensor:
        """`rtsvc.features.f0.f0_to_mel_frames` on the raw frames spanning the window, on stream times."""
        ja = max(s // F0_HOP, self.f0.first)
        jb = min(-(-e // F0_HOP) + 1, self.f0.end)
        raw = self.f0.rows[ja - self.f0.first: jb - self.f0.first].numpy()
        out = f0_to_mel_frames(raw, n, f0_start=ja, mel_start=k0)
        return torch.from_numpy(out).to(self.features.device)

    def _lap(self, name: str, started: float) -> None:
        self.last_ms[name] += (time.perf_counter() - started) * 1000.0


def _rms(audio: np.ndarray, left_reflect: bool) -> torch.Tensor:
    """RMS of the frames of `audio` as `rms_per_frame` would give them inside a longer signal whose
    left part (`left_reflect=False`: the first 768 samples are real context) and end are these."""
    x = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))[None, None]
    mode = "reflect" if x.shape[-1] > RMS_PAD else "replicate"
    x = F.pad(x, (RMS_PAD if left_reflect else 0, RMS_PAD), mode=mode)[0, 0]
    return torch.sqrt(x.unfold(-1, N_FFT, HOP_LENGTH).pow(2).mean(dim=-1))


def _ceil_to(x: int, step: int) -> int:
    return -(-x // step) * step


def _to_16k(samples_44k: int) -> int:
    """A 44.1 kHz offset that is a whole number of F0 frames (441) in 16 kHz samples (160 per frame)."""
    return samples_44k // F0_HOP * 160


__all__ = ["ENCODER_CONTEXT_S", "F0_MARGIN_FRAMES", "FeatureCache", "FrameStore"]
