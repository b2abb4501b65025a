"""RIFT-SVC V2's offline path at the release commit ec67126 (the code the published V2 checkpoint goes
with): infer.py (`main`), slicer.py (`Slicer`, its zero-crossing cuts and `get_rms`), rift_svc/rf.py
(`RF.sample`: Euler over linspace(0, 1, steps), Whisper CFG), rift_svc/utils.py (`interpolate_tensor`:
nearest) and rift_svc/encoders.py (`WhisperEncoder`).

Unchanged from c03fa59 and taken from `tests.upstream.v3_infer`: `get_mel_spectrogram`, `RMSExtractor`,
`HubertModelWithFinalProj`, `RMVPE` (torchaudio's sinc resampler at width 128), `post_process_f0`,
the slicer's silence search (`silence_tags`) and `apply_fade`.
The ContentVec and Whisper input is `torchaudio.functional.resample(audio, 44100, 16000)`: the default
width 6 (`tests.upstream.torchaudio_resample.resample`). The DiT is `tests.upstream.v2_release`'s; the
RMVPE network and the NSF-HiFiGAN generator are rtsvc's (as in v3_infer). `noise_for` / `source_for`
are test hooks (not upstream) handing in the sampler's start noise and the vocoder's phases and noise,
which upstream draws from torch's global RNG. torchaudio and click are not used: the caller loads the
audio, the output is returned instead of saved.
"""
# ruff: noqa: E501 - upstream's lines, kept as they are for side-by-side reading

import math

import numpy as np
import pyloudnorm as pyln
import torch
import torch.nn.functional as F
import transformers.models.whisper.modeling_whisper as whisper
from transformers import AutoFeatureExtractor

from tests.upstream.torchaudio_resample import resample
from tests.upstream.v2_release import DiT
from tests.upstream.v3_infer import (
    RMVPE,
    HubertModelWithFinalProj,
    RMSExtractor,
    apply_fade,
    get_mel_spectrogram,
    post_process_f0,
    silence_tags,
)

# --- slicer.py -----------------------------------------------------------------------------------


def get_rms(y, *, frame_length=2048, hop_length=512, pad_mode="constant"):
    padding = (int(frame_length // 2), int(frame_length // 2))
    y = np.pad(y, padding, mode=pad_mode)
    axis = -1
    out_strides = y.strides + tuple([y.strides[axis]])
    x_shape_trimmed = list(y.shape)
    x_shape_trimmed[axis] -= frame_length - 1
    out_shape = tuple(x_shape_trimmed) + tuple([frame_length])
    xw = np.lib.stride_tricks.as_strided(y, shape=out_shape, strides=out_strides)
    target_axis = axis - 1
    xw = np.moveaxis(xw, -1, target_axis)
    slices = [slice(None)] * xw.ndim
    slices[axis] = slice(0, None, hop_length)
    x = xw[tuple(slices)]
    power = np.mean(np.abs(x) ** 2, axis=-2, keepdims=True)
    return np.sqrt(power)


class Slicer:
    def __init__(self, sr, threshold=-30., min_length=3000, min_interval=100, hop_size=10, max_sil_kept=300,
                 look_ahead_frames=4):
        if not min_length >= min_interval >= hop_size:
            raise ValueError('The following condition must be satisfied: min_length >= min_interval >= hop_size')
        if not max_sil_kept >= hop_size:
            raise ValueError('The following condition must be satisfied: max_sil_kept >= hop_size')
        min_interval = sr * min_interval / 1000
        self.sr = sr
        self.threshold = 10 ** (threshold / 20.)
        self.hop_size = round(sr * hop_size / 1000)
        self.win_size = min(round(min_interval), 4 * self.hop_size)
        self.min_length = round(sr * min_length / 1000 / self.hop_size)
        self.min_interval = round(min_interval / self.hop_size)
        self.max_sil_kept = round(sr * max_sil_kept / 1000 / self.hop_size)
        self.look_ahead = look_ahead_frames

    def _find_zero_crossing(self, waveform, start_idx, end_idx, direction='forward'):
        samples = waveform
        start_idx = max(0, start_idx)
        end_idx = min(len(samples), end_idx)
        if direction == 'forward':
            search_range = range(start_idx, end_idx - 1)
        else:
            search_range = range(end_idx - 2, start_idx - 1, -1)
        for i in search_range:
            if samples[i] * samples[i + 1] <= 0:
                closer_point = i if abs(samples[i]) < abs(samples[i + 1]) else i + 1
                return closer_point
        return start_idx if direction == 'forward' else end_idx - 1

    def _find_best_cut_point(self, waveform, frame_idx, is_start=False):
        sample_idx = frame_idx * self.hop_size
        if is_start:
            samples = waveform
            search_end = min(len(samples), sample_idx + self.hop_size * 2)
            noise_floor = self.threshold * 0.1
            for i in range(sample_idx, search_end):
                if abs(samples[i]) > noise_floor:
                    return max(0, i - 32) // self.hop_size
            return sample_idx // self.hop_size
        window_size = self.hop_size
        start_search = max(0, sample_idx - window_size)
        end_search = min(len(waveform), sample_idx + window_size)
        cut_point = self._find_zero_crossing(waveform, start_search, end_search)
        return cut_point // self.hop_size

    def _apply_slice(self, waveform, begin, end):
        actual_begin = self._find_zero_crossing(waveform, begin * self.hop_size, (begin + self.look_ahead) * self.hop_size, 'forward')
        actual_end = self._find_zero_crossing(waveform, (end - self.look_ahead) * self.hop_size, end * self.hop_size, 'backward')
        return waveform[actual_begin:actual_end]

    def slice(self, waveform):
        samples = waveform
        if (samples.shape[0] + self.hop_size - 1) // self.hop_size <= self.min_length:
            start_pos = self._find_best_cut_point(waveform, 0, is_start=True) * self.hop_size
            return [(start_pos, waveform[start_pos:])]
        rms_list = get_rms(y=samples, frame_length=self.win_size, hop_length=self.hop_size).squeeze(0)
        sil_tags = silence_tags(self, rms_list)
        total_frames = rms_list.shape[0]
        if len(sil_tags) == 0:
            start_pos = self._find_best_cut_point(waveform, 0, is_start=True) * self.hop_size
            return [(start_pos, waveform[start_pos:])]
        chunks_with_pos = []
        if sil_tags[0][0] > 0:
            start_frame = self._find_best_cut_point(waveform, 0, is_start=True)
            end_frame = self._find_best_cut_point(waveform, sil_tags[0][0])
            chunks_with_pos.append((start_frame * self.hop_size, self._apply_slice(waveform, start_frame, end_frame)))
        for i in range(len(sil_tags) - 1):
            start_frame = self._find_best_cut_point(waveform, sil_tags[i][1])
            end_frame = self._find_best_cut_point(waveform, sil_tags[i + 1][0])
            chunks_with_pos.append((start_frame * self.hop_size, self._apply_slice(waveform, start_frame, end_frame)))
        if sil_tags[-1][1] < total_frames:
            start_frame = self._find_best_cut_point(waveform, sil_tags[-1][1])
            chunks_with_pos.append((start_frame * self.hop_size, self._apply_slice(waveform, start_frame, total_frames)))
        return chunks_with_pos


# --- rift_svc/utils.py, encoders.py ------------------------------------------------------------

def interpolate_tensor(tensor, new_size):
    tensor = tensor.unsqueeze(0).unsqueeze(0)
    interpolated = F.interpolate(tensor, size=(new_size, tensor.shape[-1]), mode='nearest')
    return interpolated.squeeze(0).squeeze(0)


def lens_to_mask(t, length=None):
    if length is None:
        length = t.amax()
    seq = torch.arange(length, device=t.device)
    return seq < t[..., None]


class WhisperEncoder(whisper.WhisperEncoder):
    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        config = whisper.WhisperConfig.from_pretrained(*args, **kwargs)
        encoder = cls(config)
        encoder_state_dict = whisper.WhisperModel.from_pretrained(*args, **kwargs).encoder.state_dict()
        encoder.load_state_dict(encoder_state_dict)
        return encoder


# --- rift_svc/rf.py ------------------------------------------------------------------------------

class RF(torch.nn.Module):
    def __init__(self, transformer, num_mel_channels=128):
        super().__init__()
        self.num_mel_channels = num_mel_channels
        self.transformer = transformer
        self.mel_min, self.mel_max = -12, 2

    def norm_mel(self, mel):
        return (mel - self.mel_min) / (self.mel_max - self.mel_min) * 2 - 1

    def denorm_mel(self, mel):
        return (mel + 1) / 2 * (self.mel_max - self.mel_min) + self.mel_min

    @torch.no_grad()
    def sample(self, src_mel, spk_id, f0, rms, cvec, whisper, frame_lens=None, steps=32, cfg_strength=2.,
               noise=None):
        """`noise`: the test hook for y0 (upstream: torch.randn per item, padded)."""
        self.eval()
        batch, mel_seq_len, device = *src_mel.shape[:2], src_mel.device
        if frame_lens is None:
            frame_lens = torch.full((batch,), mel_seq_len, device=device)
        mask = lens_to_mask(frame_lens)

        def fn(t, x):
            null_pred = self.transformer(x=x, spk=spk_id, f0=f0, rms=rms, cvec=cvec, whisper=whisper, time=t,
                                         drop_whisper=True, mask=mask)
            if cfg_strength < 1e-5:
                return null_pred
            pred = self.transformer(x=x, spk=spk_id, f0=f0, rms=rms, cvec=cvec, whisper=whisper, time=t,
                                    drop_whisper=False, mask=mask)
            return null_pred + (pred - null_pred) * cfg_strength

        y0 = noise
        t = torch.linspace(0, 1, steps, device=device)
        y = y0  # torchdiffeq odeint(method='euler') over the grid t
        for t0, t1 in zip(t[:-1], t[1:], strict=True):
            y = y + (t1 - t0) * fn(t0, y)
        out = self.denorm_mel(y)
        out = torch.where(mask.unsqueeze(-1), out, src_mel)
        return out, None


# --- infer.py ------------------------------------------------------------------------------------

def extract_state_dict(ckpt):
    state_dict = {k.replace('model.', ''): v for k, v in ckpt['state_dict'].items() if k.startswith('model.')}
    cfg = ckpt['hyper_parameters']['cfg']
    return state_dict, cfg['spk2idx'], cfg['model']['cfg'], cfg['dataset']


def load_models(model_path, rmvpe_network, vocoder, contentvec_dir, whisper_dir):
    ckpt = torch.load(model_path, map_location='cpu', weights_only=False)
    state_dict, spk2idx, dit_cfg, dataset_cfg = extract_state_dict(ckpt)
    transformer = DiT(num_speaker=len(spk2idx), **dit_cfg)
    model = RF(transformer=transformer)
    model.load_state_dict(state_dict)
    model.eval()
    rmvpe = RMVPE(rmvpe_network, hop_length=160)
    hubert = HubertModelWithFinalProj.from_pretrained(contentvec_dir).eval()
    whisper_encoder = WhisperEncoder.from_pretrained(whisper_dir).eval()
    whisper_feature_extractor = AutoFeatureExtractor.from_pretrained(whisper_dir)
    return model, vocoder, rmvpe, hubert, RMSExtractor(hop_length=512), whisper_encoder, whisper_feature_extractor, spk2idx


@torch.no_grad()
def infer(audio, model, vocoder, rmvpe, hubert, rms_extractor, whisper_encoder, whisper_feature_extractor,
          speaker_id, noise_for, source_for, key_shift=0, infer_steps=32, cfg_strength=0.0, target_loudness=-18.0,
          restore_loudness=False, fade_duration=20.0):
    """`main` from the loaded audio on (44.1 kHz mono float32), CPU, interpolate_src 0.
    noise_for(start_sample, n_frames) -> [1, n, 128]; source_for(start_sample, f0) -> (phase, noise)."""
    sample_rate, hop_length = 44100, 512
    slicer = Slicer(sr=sample_rate, threshold=-30.0, min_length=3000, min_interval=100, hop_size=10, max_sil_kept=300)
    meter = pyln.Meter(sample_rate, block_size=0.1)
    segments_with_pos = slicer.slice(audio)

    def process_segment(audio_segment, start_sample):
        original_loudness = meter.integrated_loudness(audio_segment)
        normalized_audio = pyln.normalize.loudness(audio_segment, original_loudness, target_loudness)
        max_amp = np.max(np.abs(normalized_audio))
        if max_amp > 1.0:
            normalized_audio = normalized_audio * (0.99 / max_amp)
        audio_tensor = torch.from_numpy(normalized_audio).float().unsqueeze(0)
        audio_16khz = resample(audio_tensor, sample_rate, 16000)
        mel = get_mel_spectrogram(audio_tensor, sampling_rate=sample_rate, n_fft=2048, num_mels=128,
                                  hop_size=hop_length, win_size=2048, fmin=40, fmax=16000).transpose(1, 2)
        cvec = hubert(audio_16khz)["last_hidden_state"].squeeze(0)
        cvec = interpolate_tensor(cvec, mel.shape[1])[None, :]
        input_features = whisper_feature_extractor(audio_16khz.cpu().numpy(), sampling_rate=16000, return_tensors="pt", do_normalize=True)
        whisper_outputs = whisper_encoder(**input_features, output_hidden_states=True)
        trunc_len = math.floor((audio_16khz.shape[1] / 16000) * 50)
        whisper = whisper_outputs.hidden_states[-2][0, :trunc_len]
        whisper = interpolate_tensor(whisper, mel.shape[1])[None, :]
        f0 = rmvpe.infer_from_audio(audio_tensor, sample_rate=sample_rate)
        f0 = post_process_f0(f0, sample_rate, hop_length, mel.shape[1], silence_front=0.0, cut_last=False)
        if key_shift != 0:
            f0 = f0 * 2 ** (key_shift / 12)
        f0 = torch.from_numpy(f0).float()[None, :]
        rms = rms_extractor(audio_tensor)
        spk_id = torch.LongTensor([speaker_id])
        mel_out, _ = model.sample(src_mel=mel, spk_id=spk_id, f0=f0, rms=rms, cvec=cvec, whisper=whisper,
                                  steps=infer_steps, cfg_strength=cfg_strength,
                                  noise=noise_for(start_sample, mel.shape[1]))
        phase, noise = source_for(start_sample, f0)
        audio_out = vocoder(mel_out.transpose(1, 2), f0, phase=phase, noise=noise)
        audio_out = audio_out.squeeze().cpu().numpy()
        if restore_loudness:
            audio_out_loudness = meter.integrated_loudness(audio_out)
            audio_out = pyln.normalize.loudness(audio_out, audio_out_loudness, original_loudness)
            max_amp = np.max(np.abs(audio_out))
            if max_amp > 1.0:
                audio_out = audio_out * (0.99 / max_amp)
        return audio_out

    fade_samples = int(fade_duration * sample_rate / 1000)
    result_audio = np.zeros(len(audio) + fade_samples)
    for idx, (start_sample, chunk) in enumerate(segments_with_pos):
        audio_out = process_segment(chunk, start_sample)
        expected_length = len(chunk)
        if len(audio_out) > expected_length:
            audio_out = audio_out[:expected_length]
        elif len(audio_out) < expected_length:
            audio_out = np.pad(audio_out, (0, expected_length - len(audio_out)), 'constant')
        if idx > 0:
            audio_out = apply_fade(audio_out.copy(), fade_samples, fade_in=True)
            result_audio[start_sample:start_sample + fade_samples] *= np.linspace(1, 0, fade_samples)
        if idx < len(segments_with_pos) - 1:
            audio_out[-fade_samples:] *= np.linspace(1, 0, fade_samples)
        result_audio[start_sample:start_sample + len(audio_out)] += audio_out
    result_audio = result_audio[:len(audio)]
    return result_audio, [(s, len(c)) for s, c in segments_with_pos]
