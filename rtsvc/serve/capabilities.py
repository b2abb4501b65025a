"""What the served voice can honour, told to clients (`ready`, /v1/info: `supports`) and checked
before a setting reaches the engine, so a client never meets an `internal` 1011 by moving a slider.

Two things a knob's range alone does not say:
- a denoiser whose library is not installed on this server (`denoise: rnnoise` without pyrnnoise);
- skip-layer guidance on an ONNX bundle: the skip pass is fixed in the graph at export, so a
  bundle exported without `--cfg-skip-layers` has none, and one exported with layer N runs only N.
Such settings are refused with `bad_setting` naming the fix (fatal in `start`, not in `set`).
"""

from dataclasses import dataclass, field

from rtsvc.dsp.denoise import BACKENDS, denoiser_missing
from rtsvc.settings import Knobs, knob_controls

SKIP_EPS = 1e-5  # as rtsvc.models.flow.CFG_EPS: a smaller strength runs no skip pass
ANY_LAYER = "any"


@dataclass(frozen=True)
class Capabilities:
    """`family`: "dsp", "v2" or "v3". `skip_layers`: the skip-layer blocks a V3 voice can run:
    ANY_LAYER (PyTorch), () (a bundle exported without a skip pass) or the exported blocks."""

    family: str = "dsp"
    skip_layers: tuple[int, ...] | str = ANY_LAYER
    denoise_missing: dict = field(default_factory=lambda: {
        name: fix for name in BACKENDS if (fix := denoiser_missing(name))})

    def missing(self) -> dict[str, str]:
        """knob (or `denoise=<choice>`) -> why this server cannot honour it and the fix."""
        found = {f"denoise={name}": fix for name, fix in self.denoise_missing.items()}
        if self.family == "v3" and self.skip_layers != ANY_LAYER and not self.skip_layers:
            fix = ("this bundle was exported without a skip-layer pass: re-export it with "
                   "`rtsvc export --cfg-skip-layers N`, or serve the .ckpt with --backend torch")
            found["skip_cfg_strength"] = found["cfg_skip_layers"] = fix
        return found

    def supports(self) -> dict:
        """The `supports` object of `ready` and /v1/info (shape: docs/protocol.md section 3)."""
        missing = self.missing()
        knobs = [c.name for c in knob_controls(self.family) if c.name not in missing]
        layers = self.skip_layers if self.skip_layers == ANY_LAYER else list(self.skip_layers)
        return {"knobs": knobs,
                "denoise": ["off", *(n for n in BACKENDS if n not in self.denoise_missing)],
                "cfg_skip_layers": layers if "cfg_skip_layers" in knobs else [],
                "missing": missing}

    def refusal(self, knobs: Knobs) -> str | None:
        """None when the voice can run `knobs`, else the `bad_setting` message naming the fix."""
        if knobs.denoise in self.denoise_missing:
            fix = self.denoise_missing[knobs.denoise]
            return f"denoise {knobs.denoise} is not available on this server: {fix}"
        if self.family != "v3" or self.skip_layers == ANY_LAYER or knobs.skip_cfg_strength <= SKIP_EPS:
            return None
        if not self.skip_layers:
            return f"skip_cfg_strength {knobs.skip_cfg_strength:g} cannot be used: " + \
                self.missing()["skip_cfg_strength"] + "; set skip_cfg_strength 0"
        if (knobs.cfg_skip_layers,) != tuple(self.skip_layers):
            return (f"this bundle's skip-layer pass bypasses block(s) {list(self.skip_layers)}: set "
                    f"cfg_skip_layers {self.skip_layers[0]} with skip_cfg_strength, or re-export with "
                    f"`rtsvc export --cfg-skip-layers {knobs.cfg_skip_layers}`")
        return None


def capabilities_of(voice, family: str) -> Capabilities:
    """From a loaded voice: an ONNX backend says which skip layers its graph holds."""
    backend = getattr(voice, "backend", None)
    if family == "v3" and backend is not None and hasattr(backend, "skip_layers"):
        return Capabilities(family, tuple(backend.skip_layers or ()))
    return Capabilities(family)


__all__ = ["ANY_LAYER", "Capabilities", "capabilities_of"]
