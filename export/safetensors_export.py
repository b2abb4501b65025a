"""`rtsvc export --format safetensors`: a checkpoint as a `.safetensors` voice people can share.

The DiT's tensors as they are (fp32, LoRA adapters carried; `merge_lora` folds them into plain V3
weights) plus the JSON `rtsvc.models.safetensors_voice` reads: model size, speakers, the numeric
dataset settings, a LoRA's alpha and a student's marker. Nothing else of the checkpoint goes in
(no optimizer state, no paths of the machine it was trained on). The file is read back through
the loader and every tensor compared before it is moved into place.
"""

import hashlib
import json
import math
import os
from pathlib import Path

import torch

from rtsvc import __version__
from rtsvc.errors import UserError
from rtsvc.models.families import family_of
from rtsvc.models.loading import LoadedDiT, load_dit
from rtsvc.models.safetensors_voice import (
    FORMAT,
    FORMAT_VERSION,
    MAX_DATASET_VALUE,
    METADATA_KEY,
    SUFFIX,
    is_safetensors,
)
from rtsvc.models.student import STUDENT_KEY

ONNX_ONLY = ("fp16", "int8", "with_encoders", "cfg_skip_layers")  # export options a DiT file has no use for


def check_out(out: Path, **onnx_options) -> None:
    """`--out` must name a `.safetensors` file (how `--model` tells it) and no ONNX-only option given."""
    used = [name for name in ONNX_ONLY if onnx_options.get(name)]
    if used:
        flags = ", ".join("--" + name.replace("_", "-") for name in used)
        raise UserError(f"{flags} shape(s) an ONNX bundle; --format safetensors writes the DiT weights "
                        "as they are")
    if not is_safetensors(out):
        raise UserError(f"--format safetensors writes one file named like my-voice{SUFFIX}; got --out {out}")
    if out.is_dir():
        raise UserError(f"--out {out} is a directory")


def voice_metadata(loaded: LoadedDiT, merged: bool, source: Path) -> dict:
    """The JSON that goes into the file (the layout of a checkpoint's hyper_parameters.cfg)."""
    family = family_of(loaded)
    config = loaded.config
    cfg: dict = {"model": family.model_hparams(config, f"dit-{config.dim}-{config.depth}"),
                 "spk2idx": dict(loaded.speakers), "default_speaker": next(iter(loaded.speakers))}
    dataset = {k: v for k, v in loaded.dataset.items()  # the numbers a reader accepts (no paths)
               if isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
               and math.isfinite(v) and 0 <= v <= MAX_DATASET_VALUE}
    if dataset:
        cfg["dataset"] = dataset
    alpha = getattr(config, "lora_alpha", None)
    if alpha is not None and not merged:
        cfg["training"] = {"lora_alpha": float(alpha)}
    if loaded.student is not None:
        marker = loaded.student.as_dict()
        marker["teacher"] = Path(marker["teacher"]).name  # for the record, without the trainer's folders
        cfg[STUDENT_KEY] = marker
    sha = hashlib.sha256()
    with open(source, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "family": family.name, "cfg": cfg,
            "source": {"file": source.name, "sha256": sha.hexdigest(), "rtsvc": __version__}}


def export_safetensors(ckpt: str | Path, out: str | Path, merge_lora: bool = False) -> tuple[Path, int]:
    """Write `ckpt` (anything `load_dit` reads) as a `.safetensors` voice at `out`; returns (path,
    number of tensors checked bit-identical after reading the file back)."""
    from safetensors.torch import save_file

    ckpt, out = Path(ckpt), Path(out)
    check_out(out)
    loaded = load_dit(ckpt, "cpu")
    family = family_of(loaded)
    merged = merge_lora and getattr(loaded.config, "lora_rank", None) is not None
    if merged:
        family.merge_adapters(loaded.model)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in loaded.model.state_dict().items()}
    meta = voice_metadata(loaded, merged, ckpt)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.stem}.partial{SUFFIX}")  # the loader needs the suffix
    try:
        save_file(state, str(partial), metadata={METADATA_KEY: json.dumps(meta, ensure_ascii=False)})
        back = load_dit(partial, "cpu").model.state_dict()  # the real loader, every check
        if back.keys() != state.keys() or not all(torch.equal(back[k], v) for k, v in state.items()):
            raise UserError(f"{out}: the written file does not read back bit-identical; not written")
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return out, len(state)


def export_voice_file(ckpt: Path, out: Path, format: str, merge_lora: bool, **onnx_options) -> str:
    """`rtsvc export --format safetensors`: write the voice file; the line to print."""
    if format != "safetensors":
        if format == "onnx":
            raise UserError("--merge-lora is for --format safetensors (a bundle always merges the adapters)")
        raise UserError(f"unknown --format {format!r}: use onnx or safetensors")
    check_out(out, **onnx_options)
    path, checked = export_safetensors(ckpt, out, merge_lora=merge_lora)
    return f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB; {checked} tensors read back bit-identical)"
