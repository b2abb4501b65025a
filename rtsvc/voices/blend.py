"""Blended voices: `--speaker alice:0.7,bob:0.3` mixes the speakers' embeddings.

The speaker knob holds either a name or a blend: `name:weight` pairs joined by commas (a bare name
in a blend weighs 1). Weights must be finite and non-negative with a positive sum; they are
normalised to sum to 1. Every name is checked against the model. A text that is exactly a speaker's
name is that speaker, even if it has a colon or comma in it. The DiT takes the blend as weights over
its speaker table (rtsvc.models.speakers); bundles since format 2 take them too.
"""

import math
from typing import TYPE_CHECKING

from rtsvc.errors import UserError

if TYPE_CHECKING:  # torch only where weights are made: the server checks blends without it
    import torch


def is_blend(text: str | None, speakers) -> bool:
    """True when `text` is a blend rather than one speaker's name."""
    return text is not None and text not in speakers and (":" in text or "," in text)


def parse_blend(text: str, speakers: dict[str, int]) -> dict[str, float]:
    """Name -> normalised weight of a blend, or a one-line UserError naming what is wrong."""
    weights: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.strip().rpartition(":")
        if not sep:
            name, value = value, "1"
        name = name.strip()
        if not name:
            raise UserError(f"blend {text!r}: each part is NAME:WEIGHT, e.g. alice:0.7,bob:0.3")
        if name not in speakers:
            raise UserError(f"unknown speaker {name!r} in blend {text!r}; this model has: "
                            f"{', '.join(speakers)}")
        if name in weights:
            raise UserError(f"blend {text!r} names {name!r} twice")
        try:
            weight = float(value)
        except ValueError:
            raise UserError(f"blend {text!r}: weight {value.strip()!r} of {name!r} is not a number") from None
        if not math.isfinite(weight) or weight < 0:
            raise UserError(f"blend {text!r}: weight of {name!r} must be a finite number >= 0, "
                            f"got {value.strip()}")
        weights[name] = weight
    total = sum(weights.values())
    if total <= 0:
        raise UserError(f"blend {text!r}: the weights must not all be 0")
    return {name: w / total for name, w in weights.items()}


def check_speaker(text: str | None, speakers: dict[str, int] | list[str], what: str = "this model") -> None:
    """A UserError (one line) unless `text` is None, a speaker's name or a valid blend of them."""
    if text is None or text in speakers:
        return
    if is_blend(text, speakers):
        parse_blend(text, dict.fromkeys(speakers, 0) if not isinstance(speakers, dict) else speakers)
        return
    raise UserError(f"unknown speaker {text!r}; {what} has: {', '.join(speakers)}")


def blend_weights(text: str, speakers: dict[str, int]) -> "torch.Tensor":
    """Weights [S] over the speaker table (S = highest index named + 1) of a blend."""
    import torch

    blend = parse_blend(text, speakers)
    weights = torch.zeros(max(speakers[n] for n in blend) + 1)
    for name, weight in blend.items():
        weights[speakers[name]] += weight
    return weights


def speaker_tensor(choice: "int | torch.Tensor", device: "torch.device | str") -> "torch.Tensor":
    """The DiT's `spk` for one item: [1] long of an index, [1, S] float of blend weights."""
    import torch

    if isinstance(choice, torch.Tensor):
        return choice.float()[None].to(device)
    return torch.tensor([choice], device=device)


def common_speakers(spks: list["torch.Tensor"]) -> list["torch.Tensor"]:
    """Items' `spk` in one form, so they stack: indices stay indices unless one item is a blend, then
    every item becomes weights of one width."""
    if not any(s.is_floating_point() for s in spks):
        return spks
    from rtsvc.models.speakers import speaker_weights

    rows = max(int(s.max()) + 1 if not s.is_floating_point() else s.shape[1] for s in spks)
    return [speaker_weights(s, rows) for s in spks]
