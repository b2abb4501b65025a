"""The F0 extractors rtsvc knows, as one table (torch-free: the command line's help reads it).

Every list of F0 names reads `F0_METHODS`: `--f0`'s choices and help (`MODEL_F0`), the voice
spec's check, `make_f0_extractor`, the DSP voice's trackers (`DSP_F0`), a bundle's manifest and
`rtsvc doctor` (which F0s this machine can run, and what a missing part blocks).
"""

import importlib.util
from dataclasses import dataclass

from rtsvc.errors import UserError


@dataclass(frozen=True)
class F0Method:
    name: str
    summary: str  # one line for help and doctor
    cost: str  # what it costs to run, relatively
    weights: str | None = None  # the pretrained component it needs (`rtsvc.pretrained.COMPONENTS`)
    package: str | None = None  # the Python package it needs (import name)
    models: bool = False  # offered by --f0 for model voices
    dsp: bool = False  # a tracker of the built-in DSP voice (WORLD's own, on 44.1 kHz)

    def installed(self) -> bool:
        """Its package can be imported here (found, not imported: torchfcpe is slow to import)."""
        return self.package is None or importlib.util.find_spec(self.package) is not None


F0_METHODS = (
    F0Method("rmvpe", "RMVPE network, what RIFT-SVC is trained with (the default)",
             "network: the slowest on a CPU, fast on a GPU", weights="rmvpe", models=True),
    F0Method("fcpe", "FCPE network with torchfcpe's bundled weights (nothing to download)",
             "small network: a few ms a block on a CPU", package="torchfcpe", models=True),
    F0Method("pyworld", "WORLD harvest (no network; the same as harvest)", "signal processing, slow",
             package="pyworld", models=True),
    F0Method("harvest", "WORLD harvest (no network)", "signal processing, slow", package="pyworld", dsp=True),
    F0Method("dio", "WORLD dio + stonemask (no network)", "signal processing, fast", package="pyworld",
             dsp=True),
)
BY_NAME = {m.name: m for m in F0_METHODS}
MODEL_F0 = tuple(m.name for m in F0_METHODS if m.models)  # what --f0 offers
DSP_F0 = tuple(m.name for m in F0_METHODS if m.dsp)  # the DSP voice's trackers
DEFAULT_F0 = "rmvpe"


def f0_method(name: str, allowed: tuple[str, ...] | None = None, option: str = "--f0") -> F0Method:
    """The table row of `name` (case-insensitive) among `allowed` names (default: every row); a
    UserError that lists them otherwise."""
    names = allowed if allowed is not None else tuple(BY_NAME)
    key = str(name).lower()
    if key not in names:
        raise UserError(f"unknown {option} {name!r}: use {', '.join(names[:-1])} or {names[-1]}")
    return BY_NAME[key]
