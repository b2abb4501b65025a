"""Loading transformers encoders quietly, with one-line user errors."""

import contextlib
from pathlib import Path

from rtsvc.errors import UserError

TRAINING_ONLY_WEIGHTS = {"masked_spec_embed"}  # HuBERT's masking vector: absent from inference checkpoints


@contextlib.contextmanager
def quiet_transformers():
    """No progress bars or warnings from transformers while loading: we report key problems ourselves."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_transformers_model(cls, name_or_path: str | Path, what: str, option: str, **kwargs):
    """from_pretrained with one-line user errors and a check that every weight was used and found."""
    try:
        with quiet_transformers():
            model, info = cls.from_pretrained(str(name_or_path), output_loading_info=True, **kwargs)
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load {what} from {name_or_path}: {first} (run `rtsvc download` or "
                        f"point {option} at a local folder)") from None
    missing = [k for k in info.get("missing_keys") or [] if k not in TRAINING_ONLY_WEIGHTS]
    mismatched = list(info.get("mismatched_keys") or [])
    if missing or mismatched:
        raise UserError(f"{name_or_path} does not hold a {what} checkpoint: missing weights {missing[:3]}"
                        f"{', shape mismatch ' + str(mismatched[:2]) if mismatched else ''}")
    return model, info
