"""Loading RIFT-SVC V2 / V3 DiT checkpoints and openvpi NSF-HiFiGAN vocoders, with strict keys.

A RIFT-SVC checkpoint is a PyTorch Lightning file: `state_dict` holds `model.transformer.<DiT key>`
(the rectified-flow wrapper `model` holds the DiT as `transformer`), and
`hyper_parameters["cfg"]` holds `spk2idx` (speaker name -> index), the model size (V2:
`model.cfg` {dim, depth, head_dim, ff_mult}; V3: `model` itself, flat), `dataset` and `training`
(V3 LoRA fine-tunes: lora_rank, lora_alpha). The family is told by the state dict's keys.
Lightning may pickle small helper objects (OmegaConf containers, AttributeDict);
`rtsvc.models.safe_load` reads those as plain dicts through an allow-list, so loading a
checkpoint never runs code from it.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rtsvc.errors import UserError
from rtsvc.models.dit import DiT, DiTConfig
from rtsvc.models.dit_v3 import DiTV3, DiTV3Config
from rtsvc.models.lora import lora_rank_of
from rtsvc.models.safe_load import load_torch_file
from rtsvc.models.student import STUDENT_KEY, StudentInfo, make_student
from rtsvc.models.vocoder import NsfHifiGan, VocoderConfig, fold_weight_norm

STATE_PREFIX = "model.transformer."
VOCODER_CONFIG = "config.json"
VOCODER_CHECKPOINT = "model.ckpt"
DIT_CONFIG_KEYS = ("dim", "depth", "head_dim", "ff_mult", "dropout")
MAX_DIT_SIZE = 1 << 16  # no real dim/depth/head_dim comes near: larger is corrupt metadata
V3_MARKERS = ("null_spk_embed.weight", "tembed.time_emb.weight")  # V3 DiT keys absent from V2
V2_MARKERS = ("null_whisper_embed.weight", "time_embed.time_emb.weight")  # V2 DiT keys absent from V3


@dataclass
class LoadedDiT:
    model: DiT | DiTV3  # eval mode, on the requested device
    speakers: dict[str, int]  # name -> speaker index
    config: DiTConfig | DiTV3Config
    path: Path
    dataset: dict[str, Any]  # the checkpoint's dataset settings (sample_rate, hop_length, ...)
    family: str = "v2"  # "v2" (ContentVec + Whisper) or "v3" (ContentVec, null speaker)
    student: StudentInfo | None = None  # set for a distilled student (`rtsvc distill`)
    pitch_stats: dict | None = None  # speaker -> log-F0 statistics (`rtsvc train`; rtsvc.voices.auto_pitch)

    def speaker_index(self, name: str) -> int:
        if name not in self.speakers:
            valid = ", ".join(sorted(self.speakers))
            raise UserError(f"unknown speaker {name!r}; this model has: {valid}")
        return self.speakers[name]


def _as_dict(obj: Any) -> dict:
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

def dit_family(state: dict[str, torch.Tensor]) -> str:
    """"v2" or "v3" from a DiT state dict's keys (never from a flag): V2 conditions on Whisper
    (`null_whisper_embed`, `time_embed`), V3 has a null speaker (`null_spk_embed`, `tembed`)."""
    if all(k in state for k in V3_MARKERS):
        return "v3"
    if all(k in state for k in V2_MARKERS):
        return "v2"
    raise UserError("not a RIFT-SVC V2 or V3 DiT: found neither V2 keys (null_whisper_embed, time_embed) "
                    "nor V3 keys (null_spk_embed, tembed); V1 checkpoints are not supported")


def _dit_state(ckpt: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        hint = ""
        if isinstance(ckpt, dict) and "generator" in ckpt:
            hint = " (it looks like an NSF-HiFiGAN vocoder checkpoint)"
        elif isinstance(ckpt, dict) and ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
            hint = " (it is a bare state dict, e.g. an RMVPE model.pt)"
        raise UserError(f"{path} is not a RIFT-SVC model checkpoint: no Lightning 'state_dict'{hint}")
    if not all(isinstance(k, str) and torch.is_tensor(v) for k, v in ckpt["state_dict"].items()):
        raise UserError(f"{path} is not a RIFT-SVC model checkpoint: its state_dict holds non-tensors")
    state = {k[len(STATE_PREFIX):]: v for k, v in ckpt["state_dict"].items() if k.startswith(STATE_PREFIX)}
    others = [k for k in ckpt["state_dict"] if k.startswith("model.") and not k.startswith(STATE_PREFIX)]
    if not state:
        raise UserError(f"{path} is not a RIFT-SVC model checkpoint: no '{STATE_PREFIX}*' weights")
    state.update({k[len("model."):]: ckpt["state_dict"][k] for k in others})  # reported by the strict load
    return state


def _check_sizes(sizes: dict, default_head_dim: int, path: Path) -> None:
    """Model sizes from a checkpoint's metadata are data from a stranger: whole numbers in range
    (dropout a fraction), and dim a multiple of head_dim, before any network is built from them."""
    for name, value in sizes.items():
        ok = (0 <= value < 1) if name == "dropout" else (type(value) is int and 0 < value <= MAX_DIT_SIZE)
        if isinstance(value, bool) or not isinstance(value, int | float) or not ok:
            raise UserError(f"{path}: hyper_parameters has an invalid model size {name}={value!r}")
    head_dim = sizes.get("head_dim", default_head_dim)
    if "dim" in sizes and sizes["dim"] % head_dim:
        raise UserError(f"{path}: hyper_parameters has dim={sizes['dim']}, not a multiple of "
                        f"head_dim={head_dim}")


def _v2_config(hparams: dict, state: dict[str, torch.Tensor], n_speakers: int, path: Path) -> DiTConfig:
    model_cfg = _as_dict(_as_dict(hparams.get("model")).get("cfg"))  # V2: cfg.model = {name, cfg: {...}}
    if not {"dim", "depth"} <= set(model_cfg):
        raise UserError(f"{path} has no model size in hyper_parameters.cfg.model.cfg (dim, depth)")
    kw = {k: model_cfg[k] for k in DIT_CONFIG_KEYS if k in model_cfg}
    dataset = _as_dict(hparams.get("dataset"))
    n_mel = dataset.get("n_mel_channels", 128)
    _check_sizes({**kw, "n_mel_channels": n_mel}, DiTConfig.head_dim, path)
    return DiTConfig(**kw, num_speaker=n_speakers, n_mel=n_mel,
                     cvec_dim=state["cond_embed.cvec_embed.weight"].shape[1],
                     whisper_dim=state["null_whisper_embed.weight"].shape[1])


def _default_first(speakers: dict[str, int], default: object) -> dict[str, int]:
    """The speaker table with the checkpoint's default speaker (the voice `rtsvc train` added) first:
    every front end uses the first speaker when none is given. Upstream checkpoints have no default."""
    if isinstance(default, str) and default in speakers:
        return {default: speakers[default], **{k: v for k, v in speakers.items() if k != default}}
    return speakers


def _v3_config(hparams: dict, state: dict[str, torch.Tensor], n_speakers: int, path: Path) -> DiTV3Config:
    model_cfg = _as_dict(hparams.get("model"))  # V3: cfg.model = flat DiT kwargs
    if not {"dim", "depth"} <= set(model_cfg):
        raise UserError(f"{path} has no model size in hyper_parameters.cfg.model (dim, depth)")
    kw = {k: model_cfg[k] for k in (*DIT_CONFIG_KEYS, "kernel_size", "n_mel_channels") if k in model_cfg}
    _check_sizes(kw, DiTV3Config.head_dim, path)
    kw.pop("n_mel_channels", None)
    rank = lora_rank_of(state)
    alpha = None
    if rank is not None:
        alpha = _as_dict(hparams.get("training")).get("lora_alpha")
        if alpha is None:
            raise UserError(f"{path} carries LoRA adapters (rank {rank}) but no "
                            "hyper_parameters.cfg.training.lora_alpha to scale them")
    return DiTV3Config(**kw, num_speaker=n_speakers,
                       n_mel=int(model_cfg.get("n_mel_channels", state["output.weight"].shape[0])),
                       cvec_dim=state["cond_embed.cvec_embed.weight"].shape[1],
                       lora_rank=rank, lora_alpha=None if alpha is None else float(alpha))


def checkpoint_family(path: str | Path) -> str:
    """"v2" or "v3" of a RIFT-SVC checkpoint without reading its weights (tensors are mapped)."""
    path = Path(path)
    state = _dit_state(load_torch_file(path, "model checkpoint", mmap=True), path)
    try:
        return dit_family(state)
    except UserError as err:
        raise UserError(f"{path} is {err}") from None


def load_dit(path: str | Path, device: str | torch.device = "cpu") -> LoadedDiT:
    """Load a RIFT-SVC V2 or V3 Lightning checkpoint (family told by its keys, LoRA adapters
    included); strict keys; UserError on any mismatch."""
    path = Path(path)
    ckpt = load_torch_file(path, "model checkpoint")
    state = _dit_state(ckpt, path)
    try:
        family = dit_family(state)
    except UserError as err:
        raise UserError(f"{path} is {err}") from None
    hparams = _as_dict(_as_dict(ckpt.get("hyper_parameters")).get("cfg"))
    speakers = _as_dict(hparams.get("spk2idx"))
    if not speakers:
        raise UserError(f"{path} has no speaker table (hyper_parameters.cfg.spk2idx)")
    if not all(isinstance(name, str) and type(idx) is int and idx >= 0 for name, idx in speakers.items()):
        raise UserError(f"{path}: hyper_parameters.cfg.spk2idx must map speaker names to indices >= 0")
    speakers = _default_first(speakers, hparams.get("default_speaker"))
    n_speakers = state["spk_embed.weight"].shape[0] if "spk_embed.weight" in state else len(speakers)
    if max(speakers.values()) >= n_speakers:
        raise UserError(f"{path}: speaker table lists index {max(speakers.values())} but the model "
                        f"has {n_speakers} speaker embeddings")
    if family == "v3":
        config = _v3_config(hparams, state, n_speakers, path)
        model = DiTV3(config)
        lora = f", LoRA rank {config.lora_rank}" if config.lora_rank else ""
        what = f"RIFT-SVC V3 DiT ({config.dim}-{config.depth}{lora})"
    else:
        config = _v2_config(hparams, state, n_speakers, path)
        model = DiT(config)
        what = f"RIFT-SVC V2 DiT ({config.dim}-{config.depth})"
    student = StudentInfo.from_dict(_as_dict(hparams[STUDENT_KEY])) if STUDENT_KEY in hparams else None
    if student is not None:  # its extra keys: the second time input
        make_student(model)
        what += " student"
    _strict_load(model, state, path, what)
    return LoadedDiT(model=model.to(device).eval(), speakers=speakers, config=config, path=path,
                     dataset=_as_dict(hparams.get("dataset")), family=family, student=student,
                     pitch_stats=_as_dict(hparams.get("pitch_stats")))


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
    ckpt = load_torch_file(ckpt_path, "vocoder checkpoint")
    if not isinstance(ckpt, dict) or "generator" not in ckpt:
        is_dit = isinstance(ckpt, dict) and "state_dict" in ckpt
        hint = " (it looks like a RIFT-SVC model checkpoint)" if is_dit else ""
        raise UserError(f"{ckpt_path} is not an NSF-HiFiGAN checkpoint: no 'generator' weights{hint}")
    model = NsfHifiGan(config)
    _strict_load(model, fold_weight_norm(dict(ckpt["generator"])), ckpt_path, "NSF-HiFiGAN generator")
    return model.requires_grad_(False).to(device).eval()  # inference only: no autograd bookkeeping
