"""Model families as records: what differs between RIFT-SVC V2 and V3 (and any later family), one
frozen `Family` per family, so the code that loads, converts, exports and trains a model looks its
family up instead of branching on its name.

A family's record says how its checkpoints are recognised (`markers`: DiT keys only it has) and
read (`read_config`), what it is conditioned on (`uses_whisper`; `content_resize`, how ContentVec
frames go onto the mel grid: V2's upstream `interpolate_tensor` is "nearest", V3's
`linear_interpolate_tensor` "linear"), its guidance (`guidance`: the `Guidance` fields it reads;
`guided_velocity`; `prepare_condition`, what a teacher adds to a window's conditioning once
before sampling; `batch_wide`, whether its guidance mixes the items of a batch), the velocity of
its distilled student, and how it trains (`forward`, `training_drop`, `adapters`,
`model_hparams`, `content_100fps`). The ONNX graphs of a family are listed by its name in
`export.graphs.DIT_GRAPHS` (export sits above this package).

A new family is its network (a module whose class attribute `family` is the record's name) plus
one record passed to `register`.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rtsvc.dsp.mel import denormalize_mel
from rtsvc.errors import UserError
from rtsvc.models.dit import DiT, DiTConfig
from rtsvc.models.dit_v3 import DiTV3, DiTV3Config
from rtsvc.models.flow import CFG_EPS, N_MELS, Conditioning, cfg_velocity, frame_noise, sample
from rtsvc.models.guidance import Guidance, v3_velocity, with_bad_cvec
from rtsvc.models.lora import lora_rank_of
from rtsvc.models.student import v2_student_velocity, v3_student_velocity

DIT_CONFIG_KEYS = ("dim", "depth", "head_dim", "ff_mult", "dropout")
MAX_DIT_SIZE = 1 << 16  # no real dim/depth/head_dim comes near: larger is corrupt metadata

# v(model, x, t, cond, guidance) -> guided velocity [b, n, n_mel]
GuidedFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, Conditioning, Guidance], torch.Tensor]
# u(model, x, t, dt, cond) -> a student's average velocity over [t, t + dt]
StudentFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]
# f(model, x, time, cond, drop) -> velocity; `drop` [b] bool: items whose `training_drop` condition is dropped
ForwardFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, Conditioning, torch.Tensor], torch.Tensor]


def _unchanged(cond: Conditioning, guidance: Guidance) -> Conditioning:
    return cond


def _never(guidance: Guidance) -> bool:
    return False


def _no_adapters(model: nn.Module) -> None:
    """A family without adapters has nothing to merge."""


@dataclass(frozen=True)
class Family:
    """One model family (see the module docstring)."""

    name: str  # what checkpoints' networks, bundles and prepared datasets record ("v2")
    network: type[nn.Module]  # its DiT; the class attribute `family` is `name`
    config: type  # its network's config dataclass (dim, depth, num_speaker, ...)
    markers: tuple[str, ...]  # DiT state-dict keys only this family has: how its checkpoints are told
    read_config: Callable[[dict, dict, int, Path], Any]  # (hparams cfg, state, speakers, path) -> config
    describe: Callable[[Any], str]  # its network in a message, e.g. "RIFT-SVC V2 DiT (512-8)"
    uses_whisper: bool  # conditioned on Whisper (needs the encoder, its features, its data)
    content_resize: str  # ContentVec frames onto the mel grid: "nearest" or "linear"
    guidance: tuple[str, ...]  # the `Guidance` fields it reads (knobs, distill flags, bundle defaults)
    guided_velocity: GuidedFn
    student_velocity: StudentFn | None  # None: no distilled students of this family
    forward: ForwardFn  # one evaluation with the dropped condition per item (training)
    training_drop: str  # the condition training drops for its guidance: "whisper" or "speaker"
    model_hparams: Callable[[Any, str], dict]  # upstream's hyper_parameters.cfg.model for a config
    pretrained_path_in: str = "model"  # where upstream records --pretrained: "model" or "training"
    # how the encoders' 16 kHz is made offline: None = soxr (V3's librosa.resample), else the sinc
    # resampler at this lowpass width (the V2 release's torchaudio.functional.resample: 6)
    encoder_sinc_width: int | None = None
    prepare_condition: Callable[[Conditioning, Guidance], Conditioning] = _unchanged  # once per window
    batch_wide: Callable[[Guidance], bool] = _never  # its guided velocity mixes a batch's items
    adapters: bool = False  # LoRA adapters and frozen adaptive norms (`rtsvc train --lora-rank`)
    content_100fps: bool = False  # training data's ContentVec at 100 frames/s (V3's prepare_cvec.py)
    merge_adapters: Callable[[nn.Module], None] = _no_adapters  # fold adapters in (export, distill)

    @property
    def label(self) -> str:
        return self.name.upper()

    def settings(self, guidance: dict) -> Guidance:
        """`Guidance` from a dict of strengths (a student's marker, distill flags): the fields this
        family reads, the others at their defaults."""
        known = {}
        for key, value in guidance.items():
            if key == "cfg_skip_layers" and key in self.guidance:
                known[key] = None if value is None else tuple(int(i) for i in value)
            elif key in self.guidance:
                known[key] = float(value)
        return Guidance(**known)

    def default_guidance(self) -> dict:
        """The family's live defaults as a dict (what a teacher is distilled at unless told otherwise)."""
        g = Guidance()
        return {key: getattr(g, key) for key in self.guidance}


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add a family (its name and markers must be new); returns it."""
    if family.name in FAMILIES:
        raise ValueError(f"a model family {family.name!r} is registered already")
    if not family.markers or any(set(family.markers) <= set(f.markers) for f in FAMILIES.values()):
        raise ValueError(f"family {family.name!r} needs state-dict markers no other family has")
    FAMILIES[family.name] = family
    return family


def unregister(name: str) -> None:
    """Remove a registered family (tests that register their own)."""
    FAMILIES.pop(name, None)


def family_named(name: str) -> Family:
    """The record of a family name; UserError for a name this rtsvc does not know."""
    if name not in FAMILIES:
        raise UserError(f"unknown model family {name!r}: this rtsvc knows {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of(model: nn.Module | Any) -> Family:
    """The family of a network (its class attribute `family`) or of anything carrying a `family`
    name (a LoadedDiT, a backend)."""
    return family_named(model.family)


def family_of_state(state: dict[str, torch.Tensor]) -> Family:
    """The family a DiT state dict belongs to, from its keys (never from a flag)."""
    for family in FAMILIES.values():
        if all(key in state for key in family.markers):
            return family
    known = " nor ".join(f"{f.label} keys ({', '.join(k.split('.')[0] for k in f.markers)})"
                         for f in FAMILIES.values())
    raise UserError(f"not a RIFT-SVC DiT of a known family: found neither {known}; "
                    "V1 checkpoints are not supported")


def guided_velocity(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                    guidance: Guidance) -> torch.Tensor:
    """The guided velocity of a network of any family."""
    return family_of(model).guided_velocity(model, x, t, cond, guidance)


@torch.no_grad()
def sample_mel(model: nn.Module, cond: Conditioning, steps: int = 32, guidance: Guidance = Guidance(),
               noise: torch.Tensor | None = None, seed: int = 0, start_frame: int = 0) -> torch.Tensor:
    """De-normalised log-mel [b, n, 128] for `cond`, guided as `guidance` says for the model's family.

    `noise` [b, n, 128] is the start point; when omitted every item gets
    `frame_noise(start_frame, n, seed)` (the same noise for the same absolute frames).
    """
    b, n = cond.f0.shape
    param = next(model.parameters())
    if noise is None:
        noise = frame_noise(start_frame, n, seed).expand(b, n, N_MELS)
    noise = noise.to(device=param.device, dtype=param.dtype)
    x = sample(lambda x, t: guided_velocity(model, x, t, cond, guidance), noise, steps)
    return denormalize_mel(x)


# --- reading a checkpoint's model size -----------------------------------------------------------

def _as_dict(obj: Any) -> dict:
    return obj if isinstance(obj, dict) else {}


def check_sizes(sizes: dict, default_head_dim: int, path: Path) -> None:
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


def tensor_dim(state: dict[str, torch.Tensor], key: str, axis: int, path: Path) -> int:
    """A size the model takes from one of the checkpoint's tensors (UserError if it has none)."""
    tensor = state.get(key)
    if tensor is None or tensor.ndim <= axis or tensor.shape[axis] < 1:
        raise UserError(f"{path} does not hold a RIFT-SVC DiT: {key} is missing, not a matrix or empty")
    return int(tensor.shape[axis])


def _v2_config(hparams: dict, state: dict[str, torch.Tensor], n_speakers: int, path: Path) -> DiTConfig:
    model_cfg = _as_dict(_as_dict(hparams.get("model")).get("cfg"))  # V2: cfg.model = {name, cfg: {...}}
    if not {"dim", "depth"} <= set(model_cfg):
        raise UserError(f"{path} has no model size in hyper_parameters.cfg.model.cfg (dim, depth)")
    kw = {k: model_cfg[k] for k in DIT_CONFIG_KEYS if k in model_cfg}
    dataset = _as_dict(hparams.get("dataset"))
    n_mel = dataset.get("n_mel_channels", 128)
    check_sizes({**kw, "n_mel_channels": n_mel}, DiTConfig.head_dim, path)
    return DiTConfig(**kw, num_speaker=n_speakers, n_mel=n_mel,
                     cvec_dim=tensor_dim(state, "cond_embed.cvec_embed.weight", 1, path),
                     whisper_dim=tensor_dim(state, "null_whisper_embed.weight", 1, path))


def _v3_config(hparams: dict, state: dict[str, torch.Tensor], n_speakers: int, path: Path) -> DiTV3Config:
    model_cfg = _as_dict(hparams.get("model"))  # V3: cfg.model = flat DiT kwargs
    if not {"dim", "depth"} <= set(model_cfg):
        raise UserError(f"{path} has no model size in hyper_parameters.cfg.model (dim, depth)")
    kw = {k: model_cfg[k] for k in (*DIT_CONFIG_KEYS, "kernel_size", "n_mel_channels") if k in model_cfg}
    check_sizes(kw, DiTV3Config.head_dim, path)
    kw.pop("n_mel_channels", None)
    rank = lora_rank_of(state)
    alpha = None
    if rank is not None:
        alpha = _as_dict(hparams.get("training")).get("lora_alpha")
        if alpha is None:
            raise UserError(f"{path} carries LoRA adapters (rank {rank}) but no "
                            "hyper_parameters.cfg.training.lora_alpha to scale them")
    n_mel = model_cfg.get("n_mel_channels", tensor_dim(state, "output.weight", 0, path))
    return DiTV3Config(**kw, num_speaker=n_speakers, n_mel=int(n_mel),
                       cvec_dim=tensor_dim(state, "cond_embed.cvec_embed.weight", 1, path),
                       lora_rank=rank, lora_alpha=None if alpha is None else float(alpha))


def _v2_model_hparams(c: DiTConfig, name: str) -> dict:
    return {"name": name,
            "cfg": {"dim": c.dim, "depth": c.depth, "head_dim": c.head_dim, "ff_mult": c.ff_mult}}


def _v3_model_hparams(c: DiTV3Config, name: str) -> dict:
    return {"dim": c.dim, "depth": c.depth, "n_mel_channels": c.n_mel, "head_dim": c.head_dim,
            "ff_mult": c.ff_mult, "kernel_size": c.kernel_size}


def _v3_describe(c: DiTV3Config) -> str:
    lora = f", LoRA rank {c.lora_rank}" if c.lora_rank else ""
    return f"RIFT-SVC V3 DiT ({c.dim}-{c.depth}{lora})"


# --- the two RIFT-SVC families -------------------------------------------------------------------

def _v2_guided(model, x, t, cond, guidance):
    return cfg_velocity(model, x, t, cond, guidance.cfg_strength)


def _v2_forward(model, x, time, cond, drop):
    return model(x=x, spk=cond.spk, f0=cond.f0, rms=cond.rms, cvec=cond.cvec, whisper=cond.whisper, time=time,
                 drop_whisper=drop, mask=cond.mask)


def _v3_forward(model, x, time, cond, drop):
    return model(x=x, spk=cond.spk, f0=cond.f0, rms=cond.rms, cvec=cond.cvec, time=time, drop_speaker=drop,
                 mask=cond.mask)


def _v3_batch_wide(guidance: Guidance) -> bool:
    """V3's rescale divides by the std of the whole batch (as upstream) when any pass is on."""
    if guidance.cfg_rescale <= CFG_EPS:
        return False
    return max(guidance.ds_cfg_strength, guidance.spk_cfg_strength, guidance.skip_cfg_strength) > CFG_EPS


def _v3_prepare(cond: Conditioning, guidance: Guidance) -> Conditioning:
    return with_bad_cvec(cond, guidance)  # the degraded content, once per window and not per step


def _merge_lora(model: nn.Module) -> None:
    model.merge_lora()


V2 = register(Family(
    name="v2", network=DiT, config=DiTConfig,
    markers=("null_whisper_embed.weight", "time_embed.time_emb.weight"),
    read_config=_v2_config, describe=lambda c: f"RIFT-SVC V2 DiT ({c.dim}-{c.depth})",
    uses_whisper=True, content_resize="nearest", guidance=("cfg_strength",),
    guided_velocity=_v2_guided, student_velocity=v2_student_velocity, forward=_v2_forward,
    training_drop="whisper", model_hparams=_v2_model_hparams, pretrained_path_in="model",
    encoder_sinc_width=6,
))

V3 = register(Family(
    name="v3", network=DiTV3, config=DiTV3Config,
    markers=("null_spk_embed.weight", "tembed.time_emb.weight"),
    read_config=_v3_config, describe=_v3_describe,
    uses_whisper=False, content_resize="linear",
    guidance=("ds_cfg_strength", "spk_cfg_strength", "skip_cfg_strength", "cfg_skip_layers", "cfg_rescale"),
    guided_velocity=v3_velocity, student_velocity=v3_student_velocity, forward=_v3_forward,
    training_drop="speaker", model_hparams=_v3_model_hparams, pretrained_path_in="training",
    prepare_condition=_v3_prepare, batch_wide=_v3_batch_wide, adapters=True, merge_adapters=_merge_lora,
    content_100fps=True,
))


# --- a loaded model's velocities (the sampler's and distillation's view) -------------------------

GuidedVelocity = Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]  # v(x, t, cond)
# u(x, t, dt, cond): the average velocity over [t, t + dt]
StepVelocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]


def teacher_velocity(loaded, guidance: dict) -> GuidedVelocity:
    """The teacher's guided velocity v(x, t, cond) at the given strengths (a dict of `Guidance`
    fields; those of other families are ignored). A family with a `prepare_condition` (V3's
    bad_cvec) expects it made beforehand (per item, from its valid frames:
    `training.distill_loss.batch_conditioning`)."""
    family = family_of(loaded)
    settings = family.settings(guidance)
    return lambda x, t, cond: family.guided_velocity(loaded.model, x, t, cond, settings)


def student_velocity(loaded) -> StepVelocity:
    """The student's average velocity u(x, t, dt, cond) (one branch; guidance baked in)."""
    family = family_of(loaded)
    if family.student_velocity is None:
        raise UserError(f"{family.label} students are not supported")
    return lambda x, t, dt, cond: family.student_velocity(loaded.model, x, t, dt, cond)


def default_guidance(loaded) -> dict:
    """The guidance a teacher of this family is distilled at unless told otherwise (live defaults)."""
    return family_of(loaded).default_guidance()

