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
from rtsvc.models.families import family_of_state, tensor_dim
from rtsvc.models.safe_load import load_torch_file
from rtsvc.models.safetensors_voice import is_safetensors, read_voice, voice_family
from rtsvc.models.student import STUDENT_KEY, StudentInfo, make_student
from rtsvc.models.vocoder import NsfHifiGan, VocoderConfig, fold_weight_norm

STATE_PREFIX = "model.transformer."
VOCODER_CONFIG = "config.json"
VOCODER_CHECKPOINT = "model.ckpt"


@dataclass
class LoadedDiT:
    model: torch.nn.Module  # its family's network (`DiT`, `DiTV3`), eval mode, on the requested device
    speakers: dict[str, int]  # name -> speaker index
    config: Any  # the network's config (`DiTConfig`, `DiTV3Config`)
    path: Path
    dataset: dict[str, Any]  # the checkpoint's dataset settings (sample_rate, hop_length, ...)
    family: str = "v2"  # its `rtsvc.models.families` record's name: "v2" (ContentVec + Whisper), "v3", ...
    student: StudentInfo | None = None  # set for a distilled student (`rtsvc distill`)
    pitch_stats: dict | None = None  # speaker -> log-F0 statistics (`rtsvc train`; rtsvc.voices.auto_pitch)

    def speaker_index(self, name: str) -> int:
        if name not in self.speakers:
            valid = ", ".join(sorted(self.speakers))
            raise UserError(f"unknown speaker {name!r}; this model has: {valid}")
        return self.speakers[name]


def _as_dict(obj: Any) -> dict:
    return obj if isinstance(obj, dict) else {}


def _check_key_sets(expected: set[str], given: set[str], path: Path, what: str) -> None:
    missing, extra = sorted(expected - given), sorted(given - expected)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s), e.g. {', '.join(missing[:3])}")
        if extra:
            parts.append(f"unexpected {len(extra)} key(s), e.g. {', '.join(extra[:3])}")
        raise UserError(f"{path} does not match the {what} architecture: {'; '.join(parts)}")


def _strict_load(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    _check_key_sets(set(module.state_dict()), set(state), path, what)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:  # shape mismatches
        first = str(err).strip().splitlines()[-1].strip()
        raise UserError(f"{path} does not match the {what} architecture: {first}") from None


# --- DiT ------------------------------------------------------------------------------------

def dit_family(state: dict[str, torch.Tensor]) -> str:
    """The family name of a DiT state dict, from its keys (never from a flag; see `Family.markers`)."""
    return family_of_state(state).name


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


def _check_against_tensors(build, config, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """The metadata's model size must be the one the tensors have, checked before the network is
    built: a 1.4 MB file claiming dim 4096 would otherwise allocate gigabytes first. A DiT's depth and
    width are compared directly (cheap, and a huge depth is refused before even a skeleton is built);
    then every shape, on a skeleton on the meta device (no memory)."""
    if hasattr(config, "depth"):
        blocks = {k.split(".")[1] for k in state if k.startswith("transformer_blocks.")}
        if len(blocks) != config.depth:
            raise UserError(f"{path}: hyper_parameters say depth={config.depth} but the weights hold "
                            f"{len(blocks)} transformer blocks")
    if hasattr(config, "dim") and "output.weight" in state:
        width = tensor_dim(state, "output.weight", 1, path)
        if width != config.dim:
            raise UserError(f"{path}: hyper_parameters say dim={config.dim} but the weights are {width} wide")
    with torch.device("meta"):
        expected = build().state_dict()
    _check_key_sets(set(expected), set(state), path, what)
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise UserError(f"{path} does not match the {what} architecture: {key} is "
                            f"{list(state[key].shape)} in the file, {list(tensor.shape)} in the model")


def _default_first(speakers: dict[str, int], default: object) -> dict[str, int]:
    """The speaker table with the checkpoint's default speaker (the voice `rtsvc train` added) first:
    every front end uses the first speaker when none is given. Upstream checkpoints have no default."""
    if isinstance(default, str) and default in speakers:
        return {default: speakers[default], **{k: v for k, v in speakers.items() if k != default}}
    return speakers


def checkpoint_family(path: str | Path) -> str:
    """The family name of a RIFT-SVC checkpoint without reading its weights (tensors are mapped)."""
    path = Path(path)
    if is_safetensors(path):  # a shared voice: its header only
        return voice_family(path)
    state = _dit_state(load_torch_file(path, "model checkpoint", mmap=True), path)
    try:
        return dit_family(state)
    except UserError as err:
        raise UserError(f"{path} is {err}") from None


def load_dit(path: str | Path, device: str | torch.device = "cpu") -> LoadedDiT:
    """Load a RIFT-SVC Lightning checkpoint of any registered family (told by its keys; V3 LoRA
    adapters included), or a `.safetensors` voice (no pickle; `safetensors_voice`); strict keys;
    UserError on any mismatch."""
    path = Path(path)
    if is_safetensors(path):
        state, hparams = read_voice(path)
    else:
        ckpt = load_torch_file(path, "model checkpoint")
        state = _dit_state(ckpt, path)
        hparams = _as_dict(_as_dict(ckpt.get("hyper_parameters")).get("cfg"))
    try:
        family = family_of_state(state)
    except UserError as err:
        raise UserError(f"{path} is {err}") from None
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
    config = family.read_config(hparams, state, n_speakers, path)
    what = family.describe(config)
    student = StudentInfo.from_dict(_as_dict(hparams[STUDENT_KEY])) if STUDENT_KEY in hparams else None
    what += " student" if student is not None else ""

    def build() -> torch.nn.Module:
        model = family.network(config)
        if student is not None:  # its extra keys: the second time input
            make_student(model)
        return model

    _check_against_tensors(build, config, state, path, what)  # before any memory is spent on it
    model = build()
    _strict_load(model, state, path, what)
    return LoadedDiT(model=model.to(device).eval(), speakers=speakers, config=config, path=path,
                     dataset=_as_dict(hparams.get("dataset")), family=family.name, student=student,
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
