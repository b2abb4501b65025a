"""Whisper encoder (whisper-large-v3 layout), second-to-last hidden state as RIFT-SVC's feature.

Upstream (scripts/prepare_whisper.py, infer.py): the transformers feature extractor normalises the
16 kHz waveform (zero mean, unit variance), pads it to 30 s and takes a 128-bin log-mel (3000
frames); the encoder runs on all 1500 positions; the feature is `hidden_states[-2]` (the output of
the second-to-last layer, before the final layer norm), cut to floor(seconds * 50) frames.

Only the encoder weights are read (the decoder of large-v3 is ~900M parameters we never use),
and only the first `layers - 1` layers run: `hidden_states[-2]` does not depend on the last one.
`pad_to_30s=False` runs the encoder on the window itself, with the position embeddings of the
first positions only: what a streaming engine can afford (see docs/features.md for how far that
is from the padded features).
"""

import json
import math
from pathlib import Path

import numpy as np
import torch
from transformers import WhisperConfig, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder

from rtsvc.dsp.audio import ENCODER_SAMPLE_RATE
from rtsvc.errors import UserError
from rtsvc.features.frames import resize_frames
from rtsvc.features.hf import quiet_transformers
from rtsvc.models.safe_load import load_torch_file

FRAME_RATE = 50  # encoder positions per second (mel hop 160, conv stride 2)
CHUNK_SECONDS = 30  # the encoder's fixed context: longer audio is encoded in 30 s pieces
CHUNK_SAMPLES = CHUNK_SECONDS * ENCODER_SAMPLE_RATE
LAYER_INDEX = -2  # upstream's default --layer-index
ENCODER_PREFIXES = ("model.encoder.", "encoder.")  # WhisperForConditionalGeneration / WhisperModel


def _resolve_dir(name_or_path: str | Path) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).count("/") != 1:
        raise UserError(f"Whisper encoder folder not found: {path} "
                        "(run `rtsvc download` or point --whisper at it)")
    try:  # a hub id: the local cache (or the hub when online)
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name_or_path),
                                      allow_patterns=["*.json", "*.safetensors", "pytorch_model*.bin"]))
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot get Whisper {name_or_path} from the hub cache: {first} "
                        "(run `rtsvc download` or point --whisper at a local folder)") from None


def _read_encoder_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Only the tensors under model.encoder. / encoder. from safetensors (sharded or not) or a .bin."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    if files:
        from safetensors import safe_open

        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    for prefix in ENCODER_PREFIXES:
                        if key.startswith(prefix):
                            state[key[len(prefix):]] = f.get_tensor(key)
        return state
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if not bins:
        raise UserError(f"no Whisper weights (*.safetensors or pytorch_model.bin) in {folder}")
    for file in bins:
        for key, value in load_torch_file(file, "Whisper weights").items():
            for prefix in ENCODER_PREFIXES:
                if key.startswith(prefix):
                    state[key[len(prefix):]] = value
    return state


class WhisperEncoder:
    """`WhisperEncoder.load(dir_or_hub_id).encode(audio_16k, n_frames) -> [n_frames, d_model]`."""

    def __init__(self, encoder: HFWhisperEncoder, feature_extractor: WhisperFeatureExtractor,
                 device: torch.device):
        self.encoder = encoder.eval().to(device)
        self.feature_extractor = feature_extractor
        self.device = device
        self.dim = encoder.config.d_model

    @classmethod
    def load(cls, name_or_path: str | Path, device: str | torch.device = "cpu") -> "WhisperEncoder":
        folder = _resolve_dir(name_or_path)
        if not (folder / "config.json").is_file():
            raise UserError(f"{folder} has no config.json: not a transformers Whisper folder")
        try:
            with quiet_transformers():
                config = WhisperConfig.from_pretrained(str(folder))
                feature_extractor = WhisperFeatureExtractor.from_pretrained(str(folder))
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0]
            raise UserError(f"cannot read Whisper config in {folder}: {first}") from None
        if feature_extractor.feature_size != config.num_mel_bins:
            raise UserError(f"{folder}: feature extractor has {feature_extractor.feature_size} mel bins, "
                            f"the model expects {config.num_mel_bins}")
        encoder = HFWhisperEncoder(config)
        state = _read_encoder_weights(folder)
        expected = set(encoder.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise UserError(f"{folder} does not hold a matching Whisper encoder: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")
        encoder.load_state_dict(state, strict=True)
        return cls(encoder, feature_extractor, torch.device(device))

    def log_mel(self, audio_16k: np.ndarray, pad_to_30s: bool = True) -> torch.Tensor:
        """The feature extractor exactly as upstream calls it (do_normalize=True): [1, n_mels, frames]."""
        feats = self.feature_extractor(
            np.asarray(audio_16k, dtype=np.float32)[None], sampling_rate=ENCODER_SAMPLE_RATE,
            return_tensors="pt",
            do_normalize=True, padding="max_length" if pad_to_30s else "longest",
        )
        return feats["input_features"]

    @torch.inference_mode()
    def hidden_from_mel(self, mel: torch.Tensor, layer_index: int = LAYER_INDEX,
                        position_offset: int | list[int] = 0) -> torch.Tensor:
        """log-mel [b, n_mels, frames] -> `hidden_states[layer_index]` [b, ceil(frames / 2), d].

        `position_offset` starts the position embeddings further in (clamped so the window fits):
        a short window then gets the positions its frames had in the clip upstream encoded. One
        offset for all items, or a list with one per item.
        """
        enc = self.encoder
        dtype = enc.conv1.weight.dtype
        x = torch.nn.functional.gelu(enc.conv1(mel.to(self.device, dtype)))
        x = torch.nn.functional.gelu(enc.conv2(x)).permute(0, 2, 1)
        n_pos = enc.embed_positions.num_embeddings
        if x.shape[1] > n_pos:
            raise ValueError(f"window longer than Whisper's {CHUNK_SECONDS} s context")
        x = x + enc.embed_positions.weight[position_rows(position_offset, x.shape[1], n_pos)]
        n_layers = len(enc.layers)
        # hidden_states = (embeddings, layer 1 out, ..., layer L-1 out, layer_norm(layer L out))
        stop = layer_index % (n_layers + 1)
        if stop == n_layers:
            raise ValueError("the last hidden state is layer-normed; use last_hidden_state from transformers")
        for layer in enc.layers[:stop]:
            x = layer(x, None)
        return x

    def hidden(self, audio_16k: np.ndarray, pad_to_30s: bool = True,
               position_offset: int = 0) -> torch.Tensor:
        """Features at 50 frames/s, floor(seconds * 50) of them: [frames, d] float32.

        `position_offset` (frames, only with pad_to_30s=False): see `hidden_from_mel`.
        """
        audio = np.asarray(audio_16k, dtype=np.float32).reshape(-1)
        pieces = [audio[i:i + CHUNK_SAMPLES] for i in range(0, max(len(audio), 1), CHUNK_SAMPLES)]
        outs = []
        for piece in pieces:
            if len(piece) < 2 * 160:  # the mel needs a couple of hops; pad a very short tail with silence
                piece = np.pad(piece, (0, 2 * 160 - len(piece)))
            offset = 0 if pad_to_30s else position_offset
            h = self.hidden_from_mel(self.log_mel(piece, pad_to_30s), position_offset=offset)[0]
            outs.append(h[: math.floor(len(piece) / ENCODER_SAMPLE_RATE * FRAME_RATE)])
        feats = torch.cat(outs, dim=0).float()
        return feats[: max(1, math.floor(len(audio) / ENCODER_SAMPLE_RATE * FRAME_RATE))]

    def hidden_batch(self, audios: list[np.ndarray], position_offsets: list[int]) -> list[torch.Tensor]:
        """`hidden(audio, pad_to_30s=False, position_offset=o)` of segments of one length (under 30 s)
        in one encoder pass, each with its own position offset. The log-mel (normalised per
        segment) is computed per item; the encoder's layers are per item, so each result equals its
        own `hidden` to float tolerance."""
        return hidden_batch(self, audios, position_offsets)

    def encode(self, audio_16k: np.ndarray, n_frames: int, pad_to_30s: bool = True,
               mode: str | None = None, position_offset: int = 0) -> torch.Tensor:
        """Features resized onto `n_frames` mel frames as upstream does: [n_frames, d] float32 on device."""
        return resize_frames(self.hidden(audio_16k, pad_to_30s, position_offset), n_frames, mode)


def position_rows(position_offset: int | list[int], frames: int, n_pos: int) -> torch.Tensor:
    """Rows of the position table for `frames` positions from each offset, clamped so the window
    fits: [frames] for one offset, [b, frames] for a list."""
    offsets = torch.as_tensor(position_offset, dtype=torch.long)
    start = offsets.clamp(0, n_pos - frames)
    return start[..., None] + torch.arange(frames) if offsets.ndim else start + torch.arange(frames)


def hidden_batch(encoder, audios: list[np.ndarray], position_offsets: list[int]) -> list[torch.Tensor]:
    """`WhisperEncoder.hidden_batch` for any encoder with `log_mel` and a batched `hidden_from_mel`
    (the torch one and the ONNX Runtime one share it)."""
    audios = [np.asarray(a, dtype=np.float32).reshape(-1) for a in audios]
    length = len(audios[0])
    if any(len(a) != length for a in audios) or length > CHUNK_SAMPLES:
        raise ValueError("a Whisper batch takes segments of one length, at most 30 s")
    if length < 2 * 160:  # as `hidden`: the mel needs a couple of hops
        audios = [np.pad(a, (0, 2 * 160 - length)) for a in audios]
    mel = torch.cat([encoder.log_mel(a, pad_to_30s=False) for a in audios])
    frames = max(1, math.floor(length / ENCODER_SAMPLE_RATE * FRAME_RATE))
    out = encoder.hidden_from_mel(mel, position_offset=list(position_offsets)).float()
    return [h[:frames] for h in out.unbind(0)]
