"""RIFT-SVC V3's offline path at c03fa59: infer.py (`main`, batch size 1), slicer.py (`Slicer`),
rift_svc/feature_extractors.py (`get_mel_spectrogram`, `RMSExtractor`, `HubertModelWithFinalProj`),
rift_svc/rmvpe/inference.py + spec.py + utils.py (`RMVPE.infer_from_audio`: torchaudio's sinc
resampler at lowpass_filter_width=128, the centred STFT mel, padding to 32 frames,
`to_local_average_f0`) and rift_svc/utils.py (`post_process_f0`, `linear_interpolate_tensor`).

Two networks are not transcribed here, they are only called: the RMVPE U-Net + BiGRU
(`rtsvc.features.rmvpe.Rmvpe`, loaded from the same checkpoint) and the NSF-HiFiGAN generator
(`rtsvc.models.vocoder`; its own parity is tested in tests/test_vocoder.py). The DiT and `RF.sample`
are `tests.upstream.v3_head`'s. Upstream draws its noise from torch's global RNG; `noise_for` and
`source_for` (test hooks, not upstream) hand in the sampler's start noise (`RF.sample(noise=)`) and
the vocoder's phases and noise instead, so a test can run both sides on the same noise. torchaudio
and click are not used: `load_audio` is the caller's, the output is returned instead of saved.
"""
# ruff: noqa: E501 - upstream's lines, kept as they are for side-by-side reading

import librosa
import numpy as np
import pyloudnorm as pyln
import torch
import torch.nn.functional as F
from librosa.filters import mel as librosa_mel_fn
from torch import nn
from transformers import HubertModel

from tests.upstream.torchaudio_resample import Resample
from tests.upstream.v3_head import RF, DiT, linear_interpolate_tensor

# --- slicer.py -----------------------------------------------------------------------------------


def silence_tags(slicer, rms_list):
    """Upstream Slicer.slice's silence search, line for line (the same in c03fa59 and ec67126; `self` is
    `slicer` here): (start, end) frame pairs of the silences to cut."""
    sil_tags = []
    silence_start = None
    clip_start = 0
    for i, rms in enumerate(rms_list):
        if rms < slicer.threshold:
            if silence_start is None:
                silence_start = i
            continue
        if silence_start is None:
            continue
        is_leading_silence = silence_start == 0 and i > slicer.max_sil_kept
        need_slice_middle = i - silence_start >= slicer.min_interval and i - clip_start >= slicer.min_length
        if not is_leading_silence and not need_slice_middle:
            silence_start = None
            continue
        if i - silence_start <= slicer.max_sil_kept:
            pos = rms_list[silence_start: i + 1].argmin() + silence_start
            if silence_start == 0:
                sil_tags.append((0, pos))
            else:
                sil_tags.append((pos, pos))
            clip_start = pos
        elif i - silence_start <= slicer.max_sil_kept * 2:
            pos = rms_list[i - slicer.max_sil_kept: silence_start + slicer.max_sil_kept + 1].argmin()
            pos += i - slicer.max_sil_kept
            pos_l = rms_list[silence_start: silence_start + slicer.max_sil_kept + 1].argmin() + silence_start
            pos_r = rms_list[i - slicer.max_sil_kept: i + 1].argmin() + i - slicer.max_sil_kept
            if silence_start == 0:
                sil_tags.append((0, pos_r))
                clip_start = pos_r
            else:
                sil_tags.append((min(pos_l, pos), max(pos_r, pos)))
                clip_start = max(pos_r, pos)
        else:
            pos_l = rms_list[silence_start: silence_start + slicer.max_sil_kept + 1].argmin() + silence_start
            pos_r = rms_list[i - slicer.max_sil_kept: i + 1].argmin() + i - slicer.max_sil_kept
            if silence_start == 0:
                sil_tags.append((0, pos_r))
            else:
                sil_tags.append((pos_l, pos_r))
            clip_start = pos_r
        silence_start = None
    total_frames = rms_list.shape[0]
    if silence_start is not None and total_frames - silence_start >= slicer.min_interval:
        silence_end = min(total_frames, silence_start + slicer.max_sil_kept)
        pos = rms_list[silence_start: silence_end + 1].argmin() + silence_start
        sil_tags.append((pos, total_frames + 1))
    return sil_tags


class Slicer:
    def __init__(self, sr, threshold=-30., min_length=3000, min_interval=100, hop_size=20, max_sil_kept=5000):
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

    def _apply_slice(self, waveform, begin, end):
        return waveform[begin * self.hop_size: min(waveform.shape[0], end * self.hop_size)]

    def slice(self, waveform):
        samples = waveform
        if samples.shape[0] <= self.min_length:
            return [(0, waveform)]
        rms_list = librosa.feature.rms(y=samples, frame_length=self.win_size, hop_length=self.hop_size).squeeze(0)
        sil_tags = silence_tags(self, rms_list)
        total_frames = rms_list.shape[0]
        if len(sil_tags) == 0:
            return [(0, waveform)]
        non_silence_chunks = []
        if sil_tags[0][0] > 0:
            non_silence_chunks.append((0, self._apply_slice(waveform, 0, sil_tags[0][0])))
        for i in range(1, len(sil_tags)):
            start_frame = sil_tags[i - 1][1]
            end_frame = sil_tags[i][0]
            if start_frame < end_frame:
                non_silence_chunks.append((start_frame * self.hop_size,
                                           self._apply_slice(waveform, start_frame, end_frame)))
        if sil_tags[-1][1] * self.hop_size < len(waveform):
            start_frame = sil_tags[-1][1]
            non_silence_chunks.append((start_frame * self.hop_size,
                                       self._apply_slice(waveform, start_frame, total_frames)))
        return non_silence_chunks


# --- rift_svc/feature_extractors.py --------------------------------------------------------------

mel_basis_cache = {}
hann_window_cache = {}


def get_mel_spectrogram(y, n_fft=2048, num_mels=128, sampling_rate=44100, hop_size=512, win_size=2048,
                        fmin=40, fmax=16000, center=False):
    device = y.device
    key = f"{n_fft}_{num_mels}_{sampling_rate}_{hop_size}_{win_size}_{fmin}_{fmax}_{device}"
    if key not in mel_basis_cache:
        mel = librosa_mel_fn(sr=sampling_rate, n_fft=n_fft, n_mels=num_mels, fmin=fmin, fmax=fmax)
        mel_basis_cache[key] = torch.from_numpy(mel).float().to(device)
        hann_window_cache[key] = torch.hann_window(win_size).to(device)
    mel_basis = mel_basis_cache[key]
    hann_window = hann_window_cache[key]
    padding = (n_fft - hop_size) // 2
    y = torch.nn.functional.pad(y.unsqueeze(1), (padding, padding), mode="reflect").squeeze(1)
    spec = torch.stft(y, n_fft, hop_length=hop_size, win_length=win_size, window=hann_window, center=center,
                      pad_mode="reflect", normalized=False, onesided=True, return_complex=True)
    spec = torch.sqrt(torch.view_as_real(spec).pow(2).sum(-1) + 1e-9)
    mel_spec = torch.matmul(mel_basis, spec)
    return torch.log(torch.clamp(mel_spec, min=1e-5) * 1)


class HubertModelWithFinalProj(HubertModel):
    def __init__(self, config):
        super().__init__(config)
        self.final_proj = nn.Linear(config.hidden_size, config.classifier_proj_size)


class RMSExtractor(nn.Module):
    def __init__(self, hop_length=512, window_length=2048):
        super().__init__()
        self.hop_length = hop_length
        self.window_length = window_length

    def forward(self, inp):
        audio_squared = inp ** 2
        padding = (self.window_length - self.hop_length) // 2
        audio_padded = torch.nn.functional.pad(audio_squared, (padding, padding), mode='reflect')
        frames = audio_padded.unfold(1, self.window_length, self.hop_length)
        return torch.sqrt(frames.mean(dim=-1))


# --- rift_svc/rmvpe (inference.py, spec.py, utils.py, constants.py) ------------------------------

N_CLASS, N_MELS, MEL_FMIN, MEL_FMAX, WINDOW_LENGTH, CONST = 360, 128, 30, 8000, 1024, 1997.3794084376191


class MelSpectrogram(torch.nn.Module):
    def __init__(self, n_mel_channels, sampling_rate, win_length, hop_length, n_fft=None, mel_fmin=0,
                 mel_fmax=None, clamp=1e-5):
        super().__init__()
        n_fft = win_length if n_fft is None else n_fft
        mel_basis = librosa_mel_fn(sr=sampling_rate, n_fft=n_fft, n_mels=n_mel_channels, fmin=mel_fmin,
                                   fmax=mel_fmax, htk=True)
        self.register_buffer("mel_basis", torch.from_numpy(mel_basis).float())
        self.n_fft, self.hop_length, self.win_length, self.clamp = n_fft, hop_length, win_length, clamp

    def forward(self, audio, center=True):  # keyshift=0, speed=1
        fft = torch.stft(audio, n_fft=self.n_fft, hop_length=self.hop_length, win_length=self.win_length,
                         window=torch.hann_window(self.win_length).to(audio.device), center=center,
                         return_complex=True)
        magnitude = torch.sqrt(fft.real.pow(2) + fft.imag.pow(2))
        mel_output = torch.matmul(self.mel_basis, magnitude)
        return torch.log(torch.clamp(mel_output, min=self.clamp))


def to_local_average_f0(hidden, center=None, thred=0.03):
    idx = torch.arange(N_CLASS, device=hidden.device)[None, None, :]
    idx_cents = idx * 20 + CONST
    if center is None:
        center = torch.argmax(hidden, dim=2, keepdim=True)
    start = torch.clip(center - 4, min=0)
    end = torch.clip(center + 5, max=N_CLASS)
    idx_mask = (idx >= start) & (idx < end)
    weights = hidden * idx_mask
    product_sum = torch.sum(weights * idx_cents, dim=2)
    weight_sum = torch.sum(weights, dim=2)
    cents = product_sum / (weight_sum + (weight_sum == 0))
    f0 = 10 * 2 ** (cents / 1200)
    uv = hidden.max(dim=2)[0] < thred
    f0 = f0 * ~uv
    return f0.squeeze(0).cpu().numpy()


class RMVPE:
    def __init__(self, model, hop_length=160):
        self.model = model  # the E2E0 network (rtsvc's Rmvpe on the same checkpoint)
        self.mel_extractor = MelSpectrogram(N_MELS, 16000, WINDOW_LENGTH, hop_length, None, MEL_FMIN, MEL_FMAX)
        self.resample_kernel = {}

    def mel2hidden(self, mel):
        with torch.no_grad():
            n_frames = mel.shape[-1]
            mel = F.pad(mel, (0, 32 * ((n_frames - 1) // 32 + 1) - n_frames), mode='constant')
            hidden = self.model(mel)
            return hidden[:, :n_frames]

    def infer_from_audio(self, audio, sample_rate=16000, device=None, thred=0.03):
        if sample_rate == 16000:
            audio_res = audio
        else:
            key_str = str(sample_rate)
            if key_str not in self.resample_kernel:
                self.resample_kernel[key_str] = Resample(sample_rate, 16000, lowpass_filter_width=128)
            audio_res = self.resample_kernel[key_str](audio)
        mel = self.mel_extractor(audio_res, center=True)
        hidden = self.mel2hidden(mel)
        return to_local_average_f0(hidden, thred=thred)


# --- rift_svc/utils.py ---------------------------------------------------------------------------

def post_process_f0(f0, sample_rate, hop_length, n_frames, silence_front=0.0, cut_last=True):
    start_frame = int(silence_front * sample_rate / hop_length)
    uv = f0 == 0
    if np.any(~uv):
        f0_interp = np.interp(np.where(uv)[0], np.where(~uv)[0], f0[~uv])
        f0[uv] = f0_interp
    else:
        f0 = np.zeros_like(f0)
    origin_time = 0.01 * np.arange(len(f0))
    target_time = hop_length / sample_rate * np.arange(n_frames - start_frame)
    f0 = np.interp(target_time, origin_time, f0)
    uv = np.interp(target_time, origin_time, uv.astype(float)) > 0.5
    f0[uv] = 0
    f0 = np.pad(f0, (start_frame, 0), mode='constant')
    return f0[:-1] if cut_last else f0


# --- infer.py ------------------------------------------------------------------------------------

def extract_state_dict(ckpt):
    state_dict = {k.replace('model.', ''): v for k, v in ckpt['state_dict'].items() if k.startswith('model.')}
    cfg = ckpt['hyper_parameters']['cfg']
    return state_dict, cfg['spk2idx'], cfg['model'], cfg['dataset']


def load_models(model_path, rmvpe_network, vocoder, contentvec_dir):
    """load_models on CPU (fp16 is off there); the RMVPE network and vocoder come loaded."""
    ckpt = torch.load(model_path, map_location='cpu', weights_only=False)
    state_dict, spk2idx, dit_cfg, dataset_cfg = extract_state_dict(ckpt)
    transformer = DiT(num_speaker=len(spk2idx), **dit_cfg)
    svc_model = RF(transformer=transformer)
    svc_model.load_state_dict(state_dict)
    svc_model.eval()
    rmvpe = RMVPE(rmvpe_network, hop_length=160)
    hubert = HubertModelWithFinalProj.from_pretrained(contentvec_dir).eval()
    return svc_model, vocoder, rmvpe, hubert, RMSExtractor(), spk2idx


def apply_fade(audio, fade_samples, fade_in=True):
    fade_window = np.hanning(fade_samples * 2)
    fade_curve = fade_window[:fade_samples] if fade_in else fade_window[fade_samples:]
    audio[:fade_samples] *= fade_curve
    return audio


def extract_features(audio_segment, sample_rate, hop_length, rmvpe, hubert, rms_extractor, key_shift=0,
                     ds_cfg_strength=0.0, cvec_downsample_rate=2, target_loudness=-18.0):
    meter = pyln.Meter(sample_rate, block_size=0.1)
    original_loudness = meter.integrated_loudness(audio_segment)
    normalized_audio = pyln.normalize.loudness(audio_segment, original_loudness, target_loudness)
    max_amp = np.max(np.abs(normalized_audio))
    if max_amp > 1.0:
        normalized_audio = normalized_audio * (0.99 / max_amp)
    audio_tensor = torch.from_numpy(normalized_audio).float().unsqueeze(0)
    audio_16khz = torch.from_numpy(
        librosa.resample(normalized_audio, orig_sr=sample_rate, target_sr=16000)).float().unsqueeze(0)
    mel = get_mel_spectrogram(audio_tensor, sampling_rate=sample_rate, n_fft=2048, num_mels=128, hop_size=512,
                              win_size=2048, fmin=40, fmax=16000).transpose(1, 2)
    cvec = hubert(audio_16khz)["last_hidden_state"].squeeze(0)
    cvec = linear_interpolate_tensor(cvec, mel.shape[1])[None, :]
    if ds_cfg_strength > 0:
        cvec_ds = cvec.clone()
        cvec_ds = cvec_ds[0, ::2, :]
        cvec_ds = linear_interpolate_tensor(cvec_ds, cvec_ds.shape[0] // cvec_downsample_rate)
        cvec_ds = linear_interpolate_tensor(cvec_ds, mel.shape[1])[None, :]
    else:
        cvec_ds = None
    f0 = rmvpe.infer_from_audio(audio_tensor, sample_rate=sample_rate)
    f0 = post_process_f0(f0, sample_rate, hop_length, mel.shape[1], silence_front=0.0, cut_last=False)
    if key_shift != 0:
        f0 = f0 * 2 ** (key_shift / 12)
    f0 = torch.from_numpy(f0).float()[None, :]
    rms = rms_extractor(audio_tensor)
    return mel, cvec, cvec_ds, f0, rms, original_loudness


def generate_audio(vocoder, mel_out, f0, original_loudness=None, restore_loudness=True, expected_length=None,
                   source=None):
    phase, noise = source  # test hook: upstream's SineGen draws these from the global RNG
    audio_out = vocoder(mel_out.transpose(1, 2), f0, phase=phase, noise=noise)
    audio_out = audio_out.squeeze().cpu().numpy()
    if expected_length is not None:
        if len(audio_out) > expected_length:
            audio_out = audio_out[:expected_length]
        elif len(audio_out) < expected_length:
            audio_out = np.pad(audio_out, (0, expected_length - len(audio_out)), 'constant')
    if restore_loudness and original_loudness is not None:
        meter = pyln.Meter(44100, block_size=0.1)
        audio_out_loudness = meter.integrated_loudness(audio_out)
        audio_out = pyln.normalize.loudness(audio_out, audio_out_loudness, original_loudness)
        max_amp = np.max(np.abs(audio_out))
        if max_amp > 1.0:
            audio_out = audio_out * (0.99 / max_amp)
    return audio_out


@torch.no_grad()
def infer(audio, svc_model, vocoder, rmvpe, hubert, rms_extractor, speaker_id, noise_for, source_for,
          key_shift=0, infer_steps=32, ds_cfg_strength=0.2, spk_cfg_strength=0.8, skip_cfg_strength=0.0,
          cfg_skip_layers=None, cfg_rescale=0.7, cvec_downsample_rate=2, target_loudness=-18.0,
          restore_loudness=True, fade_duration=20.0, slicer_threshold=-30.0, slicer_min_length=3000,
          slicer_min_interval=100, slicer_hop_size=10, slicer_max_sil_kept=200):
    """`main` from the loaded audio on (44.1 kHz mono float32), batch size 1, CPU.
    noise_for(start_sample, n_frames) -> [1, n, 128]; source_for(start_sample, f0) -> (phase, noise)."""
    hop_length, sample_rate = 512, 44100
    slicer = Slicer(sr=sample_rate, threshold=slicer_threshold, min_length=slicer_min_length,
                    min_interval=slicer_min_interval, hop_size=slicer_hop_size, max_sil_kept=slicer_max_sil_kept)
    segments_with_pos = slicer.slice(audio)
    fade_samples = int(fade_duration * sample_rate / 1000)
    processed_segments = []
    for start_sample, chunk in segments_with_pos:  # batch_process_segments, batch_size 1: process_segment
        mel, cvec, cvec_ds, f0, rms, original_loudness = extract_features(
            chunk, sample_rate, hop_length, rmvpe, hubert, rms_extractor, key_shift, ds_cfg_strength,
            cvec_downsample_rate, target_loudness)
        spk_id = torch.LongTensor([speaker_id])
        frame_length = torch.tensor([mel.shape[1]])
        mel_out = svc_model.sample(src_mel=mel, spk_id=spk_id, f0=f0, rms=rms, cvec=cvec, steps=infer_steps,
                                   bad_cvec=cvec_ds, ds_cfg_strength=ds_cfg_strength,
                                   spk_cfg_strength=spk_cfg_strength, skip_cfg_strength=skip_cfg_strength,
                                   cfg_skip_layers=cfg_skip_layers, cfg_rescale=cfg_rescale,
                                   frame_len=frame_length, noise=noise_for(start_sample, mel.shape[1]))
        audio_out = generate_audio(vocoder, mel_out, f0, original_loudness if restore_loudness else None,
                                   restore_loudness, expected_length=len(chunk),
                                   source=source_for(start_sample, f0))
        processed_segments.append((start_sample, audio_out, len(chunk)))
    result_audio = np.zeros(len(audio) + fade_samples)
    for idx, (start_sample, audio_out, expected_length) in enumerate(processed_segments):
        if len(audio_out) > expected_length:
            audio_out = audio_out[:expected_length]
        elif len(audio_out) < expected_length:
            audio_out = np.pad(audio_out, (0, expected_length - len(audio_out)), 'constant')
        if idx > 0:
            audio_out = apply_fade(audio_out.copy(), fade_samples, fade_in=True)
            result_audio[start_sample:start_sample + fade_samples] *= np.linspace(1, 0, fade_samples)
        if idx < len(processed_segments) - 1:
            audio_out[-fade_samples:] *= np.linspace(1, 0, fade_samples)
        result_audio[start_sample:start_sample + len(audio_out)] += audio_out
    return result_audio[:len(audio)], [(s, len(c)) for s, c in segments_with_pos]


