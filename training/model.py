"""The DiT being trained: size presets, from scratch or from a checkpoint, and the speaker table.

Fine-tuning keeps every speaker of the pretrained checkpoint at its index and appends the
dataset's new speakers as new `spk_embed` rows, started at the mean of the existing rows (an
"average voice" that the new speaker moves away from, instead of a random point the other
weights have never seen).
"""

from dataclasses import dataclass

import torch

from rtsvc.errors import UserError
from rtsvc.models.dit import DiTConfig
from rtsvc.models.families import family_named, family_of
from rtsvc.models.loading import load_dit
from rtsvc.models.lora import LoRALinear

# upstream config/model/dit-DIM-DEPTH.yaml; head_dim 64 and ff_mult 4 throughout
MODEL_PRESETS = {
    "dit-256-4": (256, 4), "dit-384-4": (384, 4), "dit-512-4": (512, 4), "dit-512-8": (512, 8),
    "dit-768-12": (768, 12), "dit-1024-12": (1024, 12), "dit-1024-16": (1024, 16),
}
DEFAULT_MODEL = "dit-768-12"


@dataclass
class TrainModel:
    dit: torch.nn.Module  # a family's network (`rtsvc.models.families`)
    spk2idx: dict[str, int]
    name: str  # preset name, e.g. dit-768-12 (or dim-depth for custom sizes)
    new_speakers: list[str]  # added to a pretrained checkpoint's table
    base_pitch_stats: dict | None = None  # the pretrained checkpoint's pitch statistics (auto pitch)

    @property
    def family(self) -> str:
        return self.dit.family


def parse_model(name: str) -> DiTConfig:
    """A preset name, or `dit-DIM-DEPTH` for any size (tests use dit-64-2)."""
    if name in MODEL_PRESETS:
        dim, depth = MODEL_PRESETS[name]
        return DiTConfig(dim=dim, depth=depth)
    parts = name.split("-")
    if len(parts) == 3 and parts[0] == "dit" and parts[1].isdigit() and parts[2].isdigit():
        dim, depth = int(parts[1]), int(parts[2])
        if dim % 64 == 0 and depth > 0:
            return DiTConfig(dim=dim, depth=depth)
    raise UserError(f"unknown --model {name!r}: use one of {', '.join(MODEL_PRESETS)} "
                    "(or dit-DIM-DEPTH with DIM a multiple of 64)")


def model_name(config: DiTConfig) -> str:
    return f"dit-{config.dim}-{config.depth}"


def from_scratch(name: str, speakers: list[str], family: str = "v2") -> TrainModel:
    """A new DiT of `family` (spectral init inside) with one embedding row per dataset speaker."""
    size = parse_model(name)
    record = family_named(family)
    config = record.config(dim=size.dim, depth=size.depth, num_speaker=len(speakers))
    dit = record.network(config)
    return TrainModel(dit, {s: i for i, s in enumerate(speakers)}, model_name(config), [])


def set_trainable(dit: torch.nn.Module, lora_rank: int | None = None, lora_alpha: float | None = None,
                  freeze_adaln_and_tembed: bool = False) -> None:
    """What trains. `lora_rank`: add adapters (if the DiT has none yet) on every attn.k_proj /
    attn.v_proj and train only them and the speaker table (upstream `apply_lora`, whose optimizer
    groups then miss A and B; here they train). `freeze_adaln_and_tembed`: upstream's option,
    the time embedding and every adaptive-norm projection stay fixed. V3 only."""
    if (lora_rank is not None or freeze_adaln_and_tembed) and not family_of(dit).adapters:
        raise UserError(f"--lora-rank and --freeze-adaln-and-tembed need a V3 model (this one is "
                        f"{family_of(dit).label})")
    if lora_rank is not None:
        if lora_rank < 1:
            raise UserError(f"--lora-rank must be at least 1, got {lora_rank}")
        if lora_alpha is None:
            raise UserError("--lora-rank needs --lora-alpha (the adapters' scale is alpha / sqrt(rank))")
        if dit.config.lora_rank is None:
            dit.add_lora(lora_rank, lora_alpha)
        elif (dit.config.lora_rank, dit.config.lora_alpha) != (lora_rank, lora_alpha):
            raise UserError(f"the checkpoint already has LoRA rank {dit.config.lora_rank} alpha "
                            f"{dit.config.lora_alpha}; pass those or leave --lora-rank out")
        for param in dit.parameters():
            param.requires_grad = False
        dit.spk_embed.weight.requires_grad = True
        for module in dit.modules():
            if isinstance(module, LoRALinear):
                module.A.requires_grad = module.B.requires_grad = True
    if freeze_adaln_and_tembed:
        for param in dit.adaln_and_time_parameters():
            param.requires_grad = False


def extend_speakers(dit: torch.nn.Module, spk2idx: dict[str, int],
                    speakers: list[str]) -> tuple[torch.nn.Module, dict, list[str]]:
    """Append rows for speakers not yet in `spk2idx`; existing indices never move."""
    new = [s for s in speakers if s not in spk2idx]
    if not new:
        return dit, dict(spk2idx), []
    old = dit.spk_embed.weight.data
    rows = old.mean(dim=0, keepdim=True).expand(len(new), -1)
    table = torch.nn.Embedding(old.shape[0] + len(new), old.shape[1])
    table.weight.data.copy_(torch.cat([old, rows], dim=0))
    dit.spk_embed = table
    dit.config.num_speaker = table.num_embeddings
    mapping = dict(spk2idx)
    for i, name in enumerate(new):
        mapping[name] = old.shape[0] + i
    return dit, mapping, new


def from_pretrained(path: str, speakers: list[str], requested: str | None = None) -> TrainModel:
    """Load an upstream or rtsvc checkpoint (strict) and add the dataset's new speakers."""
    loaded = load_dit(path, "cpu")
    name = model_name(loaded.config)
    if requested is not None and requested != name:
        raise UserError(f"--model {requested} does not match the pretrained checkpoint ({name}); "
                        "leave --model out when fine-tuning")
    dit, spk2idx, new = extend_speakers(loaded.model, loaded.speakers, speakers)
    return TrainModel(dit.train(), spk2idx, name, new, loaded.pitch_stats)
