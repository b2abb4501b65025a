"""Schedule-free AdamW with RIFT-SVC's parameter groups (spectral per-layer learning rates).

Upstream (`rift_svc/optim.py`): 2-D weights whose names end in `out.weight` or `proj.weight` get
`lr * fan_out / fan_in` (one group per distinct ratio) with weight decay, other 2-D weights get `lr`
with weight decay, 1-D parameters (biases, norms) get `lr` without decay. Betas (0.9, 0.95), linear
warmup over 5% of the run inside the optimizer. Schedule-free keeps two weight sequences: call
`optimizer.train()` before stepping and `optimizer.eval()` before evaluating or saving.
"""

from collections import defaultdict

import torch
from schedulefree import AdamWScheduleFree

BETAS = (0.9, 0.95)
WARMUP_RATIO = 0.05
SPECTRAL_SUFFIXES = ("out.weight", "proj.weight")


def param_groups(model: torch.nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """Upstream's groups, in upstream order: decay, no-decay, then one group per fan ratio."""
    decay, no_decay = [], []
    spectral: dict[float, list[torch.nn.Parameter]] = defaultdict(list)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.dim() < 2:
            no_decay.append(param)
        elif name.endswith(SPECTRAL_SUFFIXES):
            fan_out, fan_in = param.shape[-2:]
            spectral[round(fan_out / fan_in, 2)].append(param)
        else:
            decay.append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr": lr, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "lr": lr, "name": "no_decay"},
    ]
    for ratio, params in spectral.items():
        groups.append({"params": params, "weight_decay": weight_decay, "lr": lr * ratio,
                       "name": f"specp_decay_{ratio:.2f}"})
    return [g for g in groups if g["params"]]


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, max_steps: int,
                   warmup_ratio: float = WARMUP_RATIO) -> AdamWScheduleFree:
    """Schedule-free AdamW over `param_groups`, warmup = `warmup_ratio` of `max_steps`."""
    warmup = int(max_steps * warmup_ratio)
    return AdamWScheduleFree(param_groups(model, lr, weight_decay), lr=lr, betas=BETAS,
                             weight_decay=weight_decay, warmup_steps=warmup)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The base group's learning rate after warmup scaling, as the optimizer last used it."""
    group = optimizer.param_groups[0]
    return float(group.get("scheduled_lr") or group["lr"])
