"""Loading RIFT-SVC V2 DiT checkpoints and openvpi NSF-HiFiGAN vocoders, with strict keys.

A RIFT-SVC checkpoint is a PyTorch Lightning file: `state_dict` holds `model.transformer.<DiT key>`
(the rectified-flow wrapper `model` holds the DiT as `transformer`), and
`hyper_parameters["cfg"]` holds `spk2idx` (speaker name -> index), `model.cfg` (dim, depth,
head_dim, ff_mult) and `dataset` (sample_rate, hop_length, ...). Lightning may pickle small
helper objects (OmegaConf containers, AttributeDict); those are read without their packages
being installed (see `_load_torch_file`). Like upstream, such files are fully unpickled, which can
run code: load only checkpoints you trust.
"""

import pickle
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rtsvc.errors import UserError
from rtsvc.models.dit import DiT, DiTConfig
from rtsvc.models.vocoder import NsfHifiGan, VocoderConfig, fold_weight_norm

STATE_PREFIX = "model.transformer."
VOCODER_CONFIG = "config.json"
VOCODER_CHECKPOINT = "model.ckpt"
DIT_CONFIG_KEYS = ("dim", "depth", "head_dim", "ff_mult", "dropout")
V3_MARKERS = ("null_spk_embed.weight", "tembed.time_emb.weight")  # V3 DiT keys absent from V2


@dataclass
class LoadedDiT:
    model: DiT  # eval mode, on the requested device
    speakers: dict[str, int]  # name -> speaker index
    config: DiTConfig
    path: Path
    dataset: dict[str, Any]  # the checkpoint's dataset settings (sample_rate, hop_length, ...)

    def speaker_index(self, name: str) -> int:
        if name not in self.speakers:
            valid = ", ".join(sorted(self.speakers))
            raise UserError(f"unknown speaker {name!r}; this model has: {valid}")
        return self.speakers[name]


# --- reading torch files without optional pickled classes ------------------------------------

class _Stub(dict):
    """Stands in for a pickled class whose package is not installed (dict-like Lightning or
    OmegaConf helpers). Keeps whatever state the pickle restores so it can still be read."""

    def __setstate__(self, state):
        self._state = state
        content = state.get("_content") if isinstance(state, dict) else None
        if isinstance(content, dict):  # OmegaConf keeps a container's items here
            self.update(content)

    def __call__(self, *args, **kwargs):
        return _Stub()


class _PermissiveUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_Stub,), {"__module__": module})


_permissive_pickle = types.SimpleNamespace(
    Unpickler=_PermissiveUnpickler, load=pickle.load, __name__="rtsvc_permissive_pickle")


def _load_torch_file(path: Path, what: str) -> Any:
    """torch.load with clear errors: safe `weights_only` first, then a full unpickle (Lightning
    checkpoints may hold plain Python objects) where missing classes become dict stubs."""
    if not path.exists():
        raise UserError(f"{what} not found: {path}")
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory, expected a checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # not loadable with the safe loader: fall through to the full unpickler
    except Exception as err:  # noqa: BLE001 - torch raises many types for non-torch files
        raise UserError(f"{path} is not a PyTorch checkpoint ({type(err).__name__}: {err})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_permissive_pickle)
    except Exception as err:  # noqa: BLE001
        raise UserError(f"{path} is not a PyTorch checkpoint ({type(err).__name__}: {err})") from None


def _plain(obj: Any) -> Any:
    """Plain Python view of config objects (dict, AttributeDict, OmegaConf containers or stubs)."""
    if isinstance(obj, _Stub) and isinstance(getattr(obj, "_state", None), dict) and "_val" in obj._state:
        return _plain(obj._state["_val"])  # an OmegaConf value node
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def _as_dict(obj: Any) -> dict:
    obj = _plain(obj)
    return obj if isinstance(obj, dict) else {}


def _strict_load(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    expected = set(module.state_dict())
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s), e.g. {', '.join(missing[:3])}")
        if extra:
            parts.append(f"unexpected {len(extra)} key(s), e.g. {', '.join(extra[:3])}")
        raise UserError(f"{path} does not match the {what} architecture: {'; '.join(parts)}")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:  # shape mismatches
        first = str(err).strip().splitlines()[-1].strip()
        raise UserError(f"{path} does not match the {what} architecture: {first}") from None


# --- DiT ------------------------------------------------------------------------------------

def _dit_state(ckpt: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        hint = ""
        if isinstance(ckpt, dict) and "generator" in ckpt:
            hint = " (it looks like an NSF-HiFiGAN vocoder checkpoint)"
        elif isinstance(ckpt, dict) and ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
            hint = " (it is a bare state dict, e.g. an RMVPE model.pt)"
        raise UserError(f"{path} is not a RIFT-SVC model checkpoint: no Lightning 'state_dict'{hint}")
    state = {k[len(STATE_PREFIX):]: v for k, v in ckpt["state_dict"].items() if k.startswith(STATE_PREFIX)}
    others = [k for k in ckpt["state_dict"] if k.startswith("model.") and not k.startswith(STATE_PREFIX)]
    if not state:
        raise UserError(f"{path} is not a RIFT-SVC model checkpoint: no '{STATE_PREFIX}*' weights")
    if any(k in state for k in V3_MARKERS) or "null_whisper_embed.weight" not in state:
        raise UserError(f"{path} is not a RIFT-SVC V2 checkpoint (no Whisper conditioning; V1/V3 "
                        "checkpoints are not supported): use a V2 model such as pretrain-v2")
    state.update({k[len("model."):]: ckpt["state_dict"][k] for k in others})  # reported by the strict load
    return state


def _dit_config(hparams: dict, state: dict[str, torch.Tensor], n_speakers: int, path: Path) -> DiTConfig:
    model_cfg = _as_dict(_as_dict(hparams.get("model")).get("cfg"))
    if not {"dim", "depth"} <= set(model_cfg):
        raise UserError(f"{path} has no model size in hyper_parameters.cfg.model.cfg (dim, depth)")
    kw = {k: model_cfg[k] for k in DIT_CONFIG_KEYS if k in model_cfg}
    dataset = _as_dict(hparams.get("dataset"))
    return DiTConfig(**kw, num_speaker=n_speakers, n_mel=int(dataset.get("n_mel_channels", 128)),
                     cvec_dim=state["cond_embed.cvec_embed.weight"].shape[1],
                     whisper_dim=state["null_whisper_embed.weight"].shape[1])


def _default_first(speakers: dict[str, int], default: object) -> dict[str, int]:
    """The speaker table with the checkpoint's default speaker (the voice `rtsvc train` added) first:
    every front end uses the first speaker when none is given. Upstream checkpoints have no default."""
    if isinstance(default, str) and default in speakers:
        return {default: speakers[default], **{k: v for k, v in speakers.items() if k != default}}
    return speakers


def load_dit(path: str | Path, device: str | torch.device = "cpu") -> LoadedDiT:
    """Load a RIFT-SVC V2 Lightning checkpoint; strict keys; UserError on any mismatch."""
    path = Path(path)
    ckpt = _load_torch_file(path, "model checkpoint")
    state = _dit_state(ckpt, path)
    hparams = _as_dict(_as_dict(ckpt.get("hyper_parameters")).get("cfg"))
    speakers = _as_dict(hparams.get("spk2idx"))
    if not speakers:
        raise UserError(f"{path} has no speaker table (hyper_parameters.cfg.spk2idx)")
    speakers = _default_first({str(name): int(idx) for name, idx in speakers.items()},
                              hparams.get("default_speaker"))
    n_speakers = state["spk_embed.weight"].shape[0] if "spk_embed.weight" in state else len(speakers)
    if max(speakers.values()) >= n_speakers:
        raise UserError(f"{path}: speaker table lists index {max(speakers.values())} but the model "
                        f"has {n_speakers} speaker embeddings")
    config = _dit_config(hparams, state, n_speakers, path)
    model = DiT(config)
    _strict_load(model, state, path, f"RIFT-SVC V2 DiT ({config.dim}-{config.depth})")
    return LoadedDiT(model=model.to(device).eval(), speakers=speakers, config=config, path=path,
                     dataset=_as_dict(hparams.get("dataset")))


# --- vocoder --------------------------------------------------------------------------------

def load_vocoder(path: str | Path, device: str | torch.device = "cpu") -> NsfHifiGan:
    """Load an openvpi NSF-HiFiGAN: `path` is its model.ckpt (config.json beside it) or the folder."""
    path = Path(path)
    ckpt_path = path / VOCODER_CHECKPOINT if path.is_dir() else path
    config_path = ckpt_path.parent / VOCODER_CONFIG
    if not ckpt_path.exists():
        raise UserError(f"vocoder checkpoint not found: {ckpt_path}")
    if not config_path.exists():
        raise UserError(f"vocoder config not found: {config_path} (config.json must sit beside model.ckpt)")
    config = VocoderConfig.from_json(config_path)
    ckpt = _load_torch_file(ckpt_path, "vocoder checkpoint")
    if not isinstance(ckpt, dict) or "generator" not in ckpt:
        is_dit = isinstance(ckpt, dict) and "state_dict" in ckpt
        hint = " (it looks like a RIFT-SVC model checkpoint)" if is_dit else ""
        raise UserError(f"{ckpt_path} is not an NSF-HiFiGAN checkpoint: no 'generator' weights{hint}")
    model = NsfHifiGan(config)
    _strict_load(model, fold_weight_norm(dict(ckpt["generator"])), ckpt_path, "NSF-HiFiGAN generator")
    return model.requires_grad_(False).to(device).eval()  # inference only: no autograd bookkeeping
