"""Tiny random feature models in the official on-disk formats, loaded by the tests through the real loaders.

- ContentVec: a HuBERT config with hidden 768 (what the DiT consumes) but one small layer, written like
  `content-vec-best` (config.json + pytorch_model.bin whose weight-norm tensors are named weight_g /
  weight_v, as in the published file) - or with save_pretrained.
- Whisper: a WhisperForConditionalGeneration with d_model 1280 and 128 mel bins, two encoder layers
  and no decoder layers, save_pretrained + its WhisperFeatureExtractor (feature_size 128).
- RMVPE: the published E2E0 architecture, random weights, saved as {"model": state_dict}. The full size
  is 92M parameters (368 MB, ~1 s per second of audio on 2 CPU cores), so tests use a narrow variant
  by default (`full_size=False`): same module tree, the loader reads the sizes from the weights.
- `make_tiny_pretrained_dir(root)`: all of the above + the tiny vocoder in the upstream layout.
"""

import json
from pathlib import Path

import torch

from rtsvc.features.hf import quiet_transformers
from rtsvc.features.rmvpe import Rmvpe, RmvpeConfig
from rtsvc.pretrained import LAYOUT

TINY_RMVPE = RmvpeConfig(n_blocks=1, inter_layers=1, en_out_channels=2, gru_hidden=8)


def tiny_hubert_config():
    from transformers import HubertConfig

    return HubertConfig(
        hidden_size=768, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=16,
        classifier_proj_size=256, architectures=["HubertModelWithFinalProj"],
    )


def make_tiny_contentvec(directory: str | Path, seed: int = 0, legacy_bin: bool = True) -> Path:
    """Write a tiny content-vec-best folder; `legacy_bin` mimics the published pytorch_model.bin naming."""
    from rtsvc.features.contentvec import HubertModelWithFinalProj, save_published_layout

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = HubertModelWithFinalProj(tiny_hubert_config()).eval()
    if not legacy_bin:
        with quiet_transformers():
            model.save_pretrained(str(directory))
        return directory
    return save_published_layout(model, directory)


def tiny_whisper_config():
    from transformers import WhisperConfig

    return WhisperConfig(
        d_model=1280, encoder_layers=2, decoder_layers=0,
        encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=128, vocab_size=16, max_target_positions=8,
        pad_token_id=1, bos_token_id=2, eos_token_id=3, decoder_start_token_id=2, begin_suppress_tokens=None,
        suppress_tokens=None,
    )


def make_tiny_whisper(directory: str | Path, seed: int = 0) -> Path:
    """A tiny whisper-large-v3-shaped folder (model.safetensors, config.json, preprocessor_config.json)."""
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(tiny_whisper_config()).eval()  # sinusoidal positions, as real
    with quiet_transformers():
        model.save_pretrained(str(directory))
    WhisperFeatureExtractor(feature_size=128).save_pretrained(str(directory))
    return directory


def make_tiny_rmvpe(path: str | Path, seed: int = 0, full_size: bool = False) -> Path:
    """An RMVPE checkpoint {"model": state_dict}, random weights (full_size: the published sizes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = Rmvpe(RmvpeConfig() if full_size else TINY_RMVPE)
    torch.save({"model": model.state_dict()}, path)
    return path


def make_tiny_pretrained_dir(root: str | Path, seed: int = 0, whisper: bool = True) -> Path:
    """The whole upstream pretrained layout with tiny random components; returns root. `whisper=False`:
    the folder a V3 model needs (complete without Whisper)."""
    from tests.tiny_models import make_tiny_vocoder

    root = Path(root)
    make_tiny_contentvec(root / LAYOUT["contentvec"], seed)
    if whisper:
        make_tiny_whisper(root / LAYOUT["whisper"], seed)
    make_tiny_vocoder((root / LAYOUT["vocoder"]).parent, seed)
    make_tiny_rmvpe(root / LAYOUT["rmvpe"], seed)
    (root / "README.md").write_text(json.dumps({"tiny": True, "seed": seed}) + "\n")
    return root
