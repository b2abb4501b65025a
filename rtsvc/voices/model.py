"""A `Voice` backed by a RIFT-SVC model.

`ModelVoice.convert` runs one window: features (F0, RMS, ContentVec, Whisper on the mel grid)
-> rectified-flow sampling of the mel with the backend's DiT -> the backend's vocoder. The
streaming engine calls it on overlapping windows; the start noise of every mel frame is drawn
from its absolute frame index (`start_sample // 512`), so overlapping windows start from the
same noise and agree where they overlap.

Offline (the default) every call computes every feature over its window as upstream does (Whisper
padded to 30 s). `ModelVoice(..., streaming=True)` (or `voice.for_streaming()`) is the variant the
engine wants: a per-stream `rtsvc.features.cache.FeatureCache` computes F0 and RMS for the new samples
only, runs ContentVec and Whisper (unpadded) on a bounded window and reuses older frames; `fork()`
gives a session its own cache over the same backend and encoders; `reset()` clears it. The streaming
DiT samples only the frames that get vocoded plus `dit_context_ms` of left context (the DiT's cost
grows with its input; features are still computed on the encoders' window), and the vocoder runs on
those frames plus `vocoder_context` frames before them.
`last_ms` holds the last call's time per part (resample, f0, rms, contentvec, whisper, dit, vocoder).

"""

import time
from dataclasses import dataclass, fields, replace
from types import EllipsisType
from typing import TYPE_CHECKING

import numpy as np
import torch

from rtsvc.dsp.audio import ENCODER_SAMPLE_RATE, HOP_LENGTH, SAMPLE_RATE
from rtsvc.dsp.formant_warp import warp_formants
from rtsvc.dsp.mel import denormalize_mel
from rtsvc.dsp.sinc import sinc_resample
from rtsvc.errors import UserError
from rtsvc.features.cache import FeatureCache
from rtsvc.features.f0 import shift_f0
from rtsvc.features.frames import mel_frame_count
from rtsvc.features.requests import FeatureSteps, drive
from rtsvc.models.families import family_named
from rtsvc.models.flow import Conditioning, NoiseRows, counter_normal, frame_noise, sample_on_grid
from rtsvc.models.guidance import CVEC_DOWNSAMPLE_RATE, Guidance, degrade_content
from rtsvc.models.schedules import time_grid
from rtsvc.settings import Knobs
from rtsvc.voices.auto_pitch import PitchFollower, target_median_hz
from rtsvc.voices.blend import blend_weights, common_speakers, is_blend, parse_blend, speaker_tensor
from rtsvc.voices.defaults import (
    DIT_CONTEXT_MS,
    ENCODER_CONTEXT_MS,
    MAX_VOCODER_CONTEXT_FRAMES,
    MODEL_STREAM,
    VOCODER_CONTEXT_FRAMES,
)

if TYPE_CHECKING:
    from rtsvc.backends.base import Backend
    from rtsvc.features.extractor import FeatureExtractor

HARMONICS = 9  # NSF source channels (fundamental + 8 overtones)
NOISE_SEED_SALT = 0x5EED  # keeps the vocoder's per-sample noise independent of the flow noise

# --- the model voice -------------------------------------------------------------------------

class ModelVoice:
    """A `Voice` on a RIFT-SVC model: `backend` (DiT + vocoder) and `features` (F0, RMS, ContentVec,
    Whisper extraction on the mel grid).

    `streaming=True`: features come from a per-stream `FeatureCache` (incremental, Whisper unpadded);
    `encoder_context_s` is the left context the encoders see (None: the whole window, nothing reused);
    `dit_context_ms` is the left context the DiT samples before the frames that get vocoded (None: the
    whole window). Offline, the DiT always runs on the whole window. `vocoder_context`: the mel frames
    vocoded before the returned tail (their samples are thrown away; the vocoder's convolutions need
    them). `concurrent_f0` (streaming): F0 runs alongside the encoders on a side thread (same results;
    `rtsvc.features.overlap`).
    """

    sample_rate = SAMPLE_RATE
    stream_defaults = MODEL_STREAM
    uses_formant = True  # the formant knob warps the generated mel (rtsvc.dsp.formant_warp)

    def __init__(self, backend: "Backend", features: "FeatureExtractor", whisper_pad_30s: bool = True,
                 streaming: bool = False, encoder_context_s: float | None = ENCODER_CONTEXT_MS / 1000.0,
                 dit_context_ms: float | None = DIT_CONTEXT_MS, concurrent_f0: bool = False,
                 vocoder_context: int = VOCODER_CONTEXT_FRAMES):
        if dit_context_ms is not None and not dit_context_ms >= 0:  # `not >=` also refuses NaN
            raise UserError(f"DiT context must be at least 0 ms, got {dit_context_ms:g}")
        if encoder_context_s is not None and not 0 < encoder_context_s < float("inf"):
            raise UserError(f"encoder context must be a positive number of seconds, got "
                            f"{encoder_context_s:g}")
        if isinstance(vocoder_context, bool) or not isinstance(vocoder_context, int) \
                or not 0 <= vocoder_context <= MAX_VOCODER_CONTEXT_FRAMES:
            raise UserError(f"vocoder context must be a whole number of frames from 0 to "
                            f"{MAX_VOCODER_CONTEXT_FRAMES}, got {vocoder_context!r}")
        self.backend = backend
        self.features = features
        self.whisper_pad_30s = whisper_pad_30s  # upstream pads every clip to 30 s (offline path only)
        self.speakers = list(backend.speakers)
        self.streaming = streaming
        self.encoder_context_s = encoder_context_s  # streaming: None = encoders on the whole window
        self.dit_context_ms = dit_context_ms  # streaming only
        self.vocoder_context = vocoder_context  # frames; a whole window (offline) starts at frame 0 anyway
        self.concurrent_f0 = concurrent_f0
        self.cache = FeatureCache(features, encoder_context_s, concurrent_f0=concurrent_f0) \
            if streaming else None
        # streaming: the vocoder's source noise of the samples the last block vocoded, reused where the
        # next block vocodes them again (its context frames and crossfade: ~45% of them at 150.9 ms)
        self.vocoder_noise = NoiseRows(HARMONICS) if streaming else None
        self.last_ms: dict[str, float] = {}
        self.cvec_downsample_rate = CVEC_DOWNSAMPLE_RATE  # upstream's --cvec-downsample-rate (V3, offline)
        # auto pitch (rtsvc.voices.auto_pitch): per-stream follower; the target from --pitch-reference
        self.pitch_follower, self.pitch_reference, self.auto_pitch = PitchFollower(), None, None

    def _carry(self, voice: "ModelVoice") -> "ModelVoice":
        voice.pitch_reference = self.pitch_reference  # what a fork shares besides the weights
        return voice

    def for_streaming(self, encoder_context_s: float | None | EllipsisType = ...,
                      dit_context_ms: float | None | EllipsisType = ...,
                      vocoder_context: int | None = None) -> "ModelVoice":
        """The streaming variant over the same backend and encoders, with a fresh feature cache;
        the contexts default to this voice's (from `open_model`, else the defaults)."""
        if encoder_context_s is ...:
            encoder_context_s = self.encoder_context_s
        if dit_context_ms is ...:
            dit_context_ms = self.dit_context_ms
        vocoder_context = self.vocoder_context if vocoder_context is None else vocoder_context
        return self._carry(ModelVoice(self.backend, self.features, self.whisper_pad_30s, True,
                                      encoder_context_s, dit_context_ms, self.concurrent_f0, vocoder_context))

    def fork(self) -> "ModelVoice":
        """Same weights, own per-stream state (what the server gives each session)."""
        return self._carry(ModelVoice(self.backend, self.features, self.whisper_pad_30s, self.streaming,
                                      self.encoder_context_s, self.dit_context_ms, self.concurrent_f0,
                                      self.vocoder_context))

    def reset(self) -> None:
        self.pitch_follower.reset()
        if self.cache is not None:
            self.cache.reset()
        if self.vocoder_noise is not None:
            self.vocoder_noise.clear()
        reset = getattr(self.features, "reset", None)
        if reset is not None:
            reset()

    def speaker_index(self, name: str | None) -> "int | torch.Tensor":
        """The speaker's index, or a blend's weights [S] over the speaker table (rtsvc.voices.blend)."""
        if is_blend(name, self.backend.speakers):
            weights = blend_weights(name, self.backend.speakers)
            if not getattr(self.backend, "takes_speaker_weights", True):
                raise UserError("speaker blends need a bundle of format 2 or later; this one takes one "
                                "speaker index: export it again with `rtsvc export`")
            return weights
        if name is None:
            return self.backend.speakers[self.speakers[0]]
        if name not in self.backend.speakers:
            raise UserError(f"unknown speaker {name!r}; this model has: {', '.join(self.speakers)}")
        return self.backend.speakers[name]

    @torch.inference_mode()
    def convert(self, audio: np.ndarray, knobs: Knobs, start_sample: int = 0,
                tail: int | None = None) -> np.ndarray:
        job = self.prepare(audio, knobs, start_sample, tail)
        if job is None:  # nothing asked for, or less than one mel frame: silence
            return np.zeros(len(audio) if tail is None else int(tail), dtype=np.float32)
        # the batch path with one job (`rtsvc.voices.batch` runs many streams' jobs the same way)
        started = time.perf_counter()
        mel = sample_group(self.backend, [job])  # noise by absolute frame: any crop draws the same noise
        self.last_ms["dit"] = (time.perf_counter() - started) * 1000.0
        started = time.perf_counter()
        out = vocode_group(self.backend, [job], mel)[0]
        self.last_ms["vocoder"] = (time.perf_counter() - started) * 1000.0
        return out

    def prepare(self, audio: np.ndarray, knobs: Knobs, start_sample: int = 0,
                tail: int | None = None) -> "BlockJob | None":
        """The per-stream half of `convert`: features and crops, everything the DiT and the vocoder
        need (None: nothing to convert). `rtsvc.voices.batch` runs many streams' jobs as one batch."""
        side = None if self.cache is None else self.cache.side_thread  # F0 beside the encoders
        return drive(self.features, self.prepare_steps(audio, knobs, start_sample, tail), side)

    def prepare_steps(self, audio: np.ndarray, knobs: Knobs, start_sample: int = 0,
                      tail: int | None = None) -> FeatureSteps:
        """`prepare` as a generator of feature requests (the streaming cache's `window_steps`;
        offline voices compute their features in place and yield none); returns the BlockJob."""
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        length = len(audio)
        need = length if tail is None else int(tail)
        if not 0 <= need <= length:
            raise ValueError(f"tail {tail} must be between 0 and the window length {length}")
        spk = self.speaker_index(knobs.speaker)  # before any work: a bad name fails fast
        if need == 0:
            return None
        n = mel_frame_count(length)  # upstream's grid: the last length % 512 samples come out silent
        if n == 0:
            return None
        if self.cache is not None:
            features = yield from self.cache.window_steps(audio, start_sample)
            new_frames = -(-need // HOP_LENGTH)
            semitones = self._semitones(knobs, features[0], new_frames)
            cond, f0 = self._stream_conditioning(features, spk, semitones)
        else:
            self.last_ms = {}
            cond, f0 = self._conditioning(audio, n, spk, knobs.pitch_shift, knobs)
        # vocode only the frames under the requested tail, plus the vocoder's left context
        first = max(0, (length - need) // HOP_LENGTH - self.vocoder_context)
        dit_first = self._dit_first(first)
        noise = None if self.vocoder_noise is None else self.vocoder_noise.get(
            start_sample + first * HOP_LENGTH, (n - first) * HOP_LENGTH, knobs.seed ^ NOISE_SEED_SALT)[None]
        return BlockJob(crop(cond, dit_first), f0, first, dit_first, start_sample, knobs,
                        length - need - first * HOP_LENGTH, need, noise)

    def _dit_first(self, first: int) -> int:
        """First window frame the DiT samples: `dit_context_ms` before the vocoded frames (streaming)."""
        if self.cache is None or self.dit_context_ms is None:
            return 0
        return max(0, first - int(round(self.dit_context_ms * SAMPLE_RATE / 1000.0 / HOP_LENGTH)))

    def _stream_conditioning(self, features: tuple, spk: int, semitones: float):
        f0, rms, cvec, whisper = features
        self.last_ms = dict(self.cache.last_ms)
        device = self.backend.device
        f0 = shift_f0(f0, semitones).to(device)[None]  # shifted F0 feeds both the DiT and the vocoder
        cond = Conditioning(spk=speaker_tensor(spk, device), f0=f0, rms=rms.to(device)[None],
                            cvec=cvec.to(device)[None],
                            whisper=None if whisper is None else whisper.to(device)[None])
        return cond, f0

    def _conditioning(self, audio: np.ndarray, n: int, spk: int, semitones: float,
                      knobs: Knobs | None = None):
        """Every feature over the whole window on its n = len // 512 frames, as upstream's infer.py
        (the offline path): the encoders hear the family's 16 kHz (`FeatureExtractor.encoder_16k`), F0
        the sinc resampler upstream's RMVPE uses."""
        feats, device = self.features, self.backend.device
        row = lambda a: torch.as_tensor(a, dtype=torch.float32).to(device)[None]  # noqa: E731 - [1, n, ...]
        audio_16k = self._timed("resample", feats.encoder_16k, audio)
        f0_16k = self._timed("resample_f0", sinc_resample, audio, SAMPLE_RATE, ENCODER_SAMPLE_RATE)
        auto = knobs is not None and knobs.pitch_mode != "fixed"
        f0 = row(self._timed("f0", feats.f0_clip, audio, f0_16k, n, 0.0 if auto else semitones))  # shifted
        if auto:  # auto pitch hears the unshifted F0 of the whole window
            f0 = shift_f0(f0, self._semitones(knobs, f0[0], n))
        whisper = None
        if feats.whisper_encoder is not None:  # V2 only
            whisper = row(self._timed("whisper", feats.whisper, audio_16k, n,
                                      pad_to_30s=self.whisper_pad_30s))
        cond = Conditioning(spk=speaker_tensor(spk, device), f0=f0,
                            rms=row(self._timed("rms", feats.rms, audio)),
                            cvec=row(self._timed("contentvec", feats.content, audio_16k, n)), whisper=whisper)
        if self.cvec_downsample_rate != CVEC_DOWNSAMPLE_RATE:  # V3's degraded content at another rate
            cond = replace(cond, bad_cvec=degrade_content(cond.cvec, self.cvec_downsample_rate))
        return cond, f0

    def _semitones(self, knobs: Knobs, f0: torch.Tensor, new_frames: int) -> float:
        """The block's pitch shift: `pitch_shift`, plus in auto mode the follower's shift after hearing
        the window's last `new_frames` F0 frames (unshifted Hz); `auto_pitch` keeps it for the status."""
        if knobs.pitch_mode == "fixed":
            self.auto_pitch = None
            return knobs.pitch_shift
        name = knobs.speaker or self.speakers[0]
        blend = parse_blend(name, self.backend.speakers) if is_blend(name, self.backend.speakers) else None
        target = target_median_hz(getattr(self.backend, "pitch_stats", {}), name, blend, self.pitch_reference)
        new = f0[-new_frames:].detach().cpu().numpy() if new_frames > 0 else np.zeros(0)
        self.auto_pitch = self.pitch_follower.update(new, target, knobs.pitch_mode == "auto-continuous")
        return self.auto_pitch + knobs.pitch_shift

    def f0_of_audio(self, audio: np.ndarray) -> np.ndarray:
        """F0 (Hz per mel frame, unshifted) of 44.1 kHz audio with this voice's F0 extractor."""
        n = -(-len(audio) // HOP_LENGTH)
        padded = np.pad(np.asarray(audio, dtype=np.float32), (0, n * HOP_LENGTH - len(audio)))
        audio_16k = sinc_resample(padded, SAMPLE_RATE, ENCODER_SAMPLE_RATE)  # as F0 hears it everywhere
        return torch.as_tensor(self.features.f0(audio_16k, n)).cpu().numpy()

    def _timed(self, name: str, fn, *args, **kwargs):
        started = time.perf_counter()
        out = fn(*args, **kwargs)
        self.last_ms[name] = (time.perf_counter() - started) * 1000.0
        return out

    @property
    def default_steps(self) -> int | None:
        """Grid points a distilled student runs by default (its evaluations + 1); None for a teacher."""
        student = getattr(self.backend, "student", None)
        return None if student is None else student.nfe + 1

    def sampling_grid(self, knobs: Knobs) -> torch.Tensor:
        return sampling_grid(self.backend, knobs)


@dataclass
class BlockJob:
    """One window after feature extraction: the DiT's conditioning (cropped to its frames), the
    window's shifted F0 and where the vocoded frames and the returned samples start."""

    cond: Conditioning  # [1, n - dit_first, ...]
    f0: torch.Tensor  # [1, n] Hz, shifted: feeds the vocoder (and, cropped, the DiT)
    first: int  # first vocoded window frame
    dit_first: int  # first window frame the DiT samples
    start_sample: int  # the window's absolute position in its stream
    knobs: Knobs
    begin: int  # first returned sample of the vocoded audio
    need: int  # samples returned
    noise: torch.Tensor | None = None  # the vocoder's source noise, when the voice drew it (streaming)

    @property
    def noise_frame(self) -> int:
        """Absolute mel frame of the DiT's first frame (its start noise is drawn by frame)."""
        return self.start_sample // HOP_LENGTH + self.dit_first

    def cut(self, vocoded: np.ndarray) -> np.ndarray:
        """The `need` returned samples; past the last whole mel frame, silence (as upstream)."""
        out = vocoded[self.begin:self.begin + self.need]
        return np.pad(out, (0, self.need - len(out)))


# --- the networks' half of a block, for one job or many (`rtsvc.voices.batch`) -------------------

def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Tensors as one batch; one job's own tensor as it is (a copy can change the float rounding of
    what reads it: the one-stream path stays bit-identical to its earlier self)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def stack(items: list[Conditioning]) -> Conditioning:
    """Conditionings of equal frame count as one batch (a field stays None only if it is in all)."""
    if len(items) == 1:
        return items[0]
    columns = {f.name: [getattr(c, f.name) for c in items]
               for f in fields(Conditioning) if f.name != "items_alone"}
    columns["spk"] = common_speakers(columns["spk"])  # a blend among indices: all as weights
    return Conditioning(**{name: None if col[0] is None else torch.cat(col, dim=0)
                           for name, col in columns.items()}, items_alone=items[0].items_alone)


def sample_group(backend: "Backend", jobs: list[BlockJob]) -> list[torch.Tensor]:
    """Stacked DiT sampling of jobs with one `rtsvc.voices.batch.dit_key` (frames, steps, guidance):
    each job's log-mel [1, 128, vocoded frames]; per item its conditioning and start noise (drawn by
    its absolute frame index and seed, so any crop and any batch draws the same noise)."""
    device = backend.device
    frames = jobs[0].cond.f0.shape[1]
    guidance = guidance_of(jobs[0].knobs)
    conds = [j.cond for j in jobs]
    if backend.student is None:  # a teacher's per-window preparation (V3: bad_cvec), per item
        prepare = family_named(backend.family).prepare_condition
        conds = [prepare(c, guidance) for c in conds]
    cond = stack(conds)
    noise = torch.stack([frame_noise(j.noise_frame, frames, j.knobs.seed) for j in jobs]).to(device)
    velocity = lambda x, t, dt: backend.step_velocity(x, t, dt, cond, guidance)  # noqa: E731 - students too
    x = sample_on_grid(velocity, noise, sampling_grid(backend, jobs[0].knobs))
    mel = denormalize_mel(x).transpose(1, 2)  # [b, 128, frames]
    return [warp_formants(mel[k:k + 1, :, j.first - j.dit_first:], j.knobs.formant_shift)  # per job
            for k, j in enumerate(jobs)]


def vocode_group(backend: "Backend", jobs: list[BlockJob], mels: list[torch.Tensor]) -> list[np.ndarray]:
    """The stacked vocoder for jobs with one `rtsvc.voices.batch.vocoder_key` (vocoded frames): each
    job's returned samples (see `vocoder_source` for why a tail equals the whole)."""
    device = backend.device
    sources = [vocoder_source(j.f0, j.first, j.start_sample, j.knobs.seed, j.noise) for j in jobs]
    phase = _cat([p for p, _ in sources]).to(device)
    noise = _cat([n for _, n in sources]).to(device)
    f0 = _cat([j.f0[:, j.first:] for j in jobs])
    audio = backend.vocode(_cat(mels), f0, phase, noise).float().cpu().numpy()
    return [j.cut(a) for j, a in zip(jobs, audio, strict=True)]


def vocoder_source(f0: torch.Tensor, first: int, start_sample: int, seed: int,
                   noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Harmonic phases [1, 9] and source noise [1, samples, 9] for vocoding frames first ... n-1 of
    f0 [1, n]. The phases start where vocoding the whole window would have them at frame `first`,
    and the noise is tied to absolute samples, so vocoding a tail gives the same samples as
    vocoding everything (up to the receptive field). `noise`: that noise drawn already (a streaming
    voice's `NoiseRows`: the same values)."""
    device = f0.device
    cycles = (f0[:, :first].double() * HOP_LENGTH / SAMPLE_RATE).sum(dim=1, keepdim=True)
    harmonic = torch.arange(1, HARMONICS + 1, dtype=torch.float64, device=device)
    phase = ((cycles * harmonic) % 1.0 + base_phase(seed).to(device)) % 1.0
    n_samples = (f0.shape[1] - first) * HOP_LENGTH
    if noise is None:
        noise = counter_normal(start_sample + first * HOP_LENGTH, n_samples, HARMONICS,
                               seed ^ NOISE_SEED_SALT)[None]
    noise = noise.to(device)
    return phase.float(), noise


def crop(cond: Conditioning, first: int) -> Conditioning:
    """The conditioning from frame `first` on (the DiT's positions are relative: rotary + conv)."""
    return cond.crop(first)


def sampling_grid(backend: "Backend", knobs: Knobs) -> torch.Tensor:
    """`knobs.steps` grid points: a student's own grid (on its teacher's lattice), else the schedule's."""
    student = getattr(backend, "student", None)
    if student is not None:
        return torch.tensor(student.grid_for(knobs.steps), device=backend.device)
    return time_grid(knobs.steps, knobs.schedule, backend.device)


def guidance_of(knobs: Knobs) -> Guidance:
    """The guidance settings of both families from the live knobs."""
    layers = None if knobs.cfg_skip_layers < 0 else (knobs.cfg_skip_layers,)
    return Guidance(cfg_strength=knobs.cfg_strength, ds_cfg_strength=knobs.ds_cfg_strength,
                    spk_cfg_strength=knobs.spk_cfg_strength, skip_cfg_strength=knobs.skip_cfg_strength,
                    cfg_skip_layers=layers, cfg_rescale=knobs.cfg_rescale)


def base_phase(seed: int) -> torch.Tensor:
    """Initial harmonic phases in cycles [1, 9], uniform as upstream (fundamental at 0), seeded."""
    phase = torch.rand(1, HARMONICS, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    phase[:, 0] = 0.0
    return phase
