"""Running the real `rtsvc` entry point in-process (one torch import for all CLI tests)."""

import contextlib
import io
import sys

import numpy as np
import pytest
import soundfile as sf

from rtsvc.commands import cli

SR = 44100


def run_cli(args: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """`rtsvc ARGS` through cli.main (the console script); returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["rtsvc", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    out = capsys.readouterr()
    code = exc.value.code if isinstance(exc.value.code, int) else (0 if exc.value.code is None else 1)
    return code, out.out, out.err


def run_cli_captured(args: list[str]) -> tuple[int, str, str]:
    """`run_cli` for module-scoped fixtures (capsys and monkeypatch are function-scoped): argv is set
    and the output captured by hand."""
    mp = pytest.MonkeyPatch()
    out, err = io.StringIO(), io.StringIO()
    mp.setattr(sys, "argv", ["rtsvc", *map(str, args)])
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            with pytest.raises(SystemExit) as exc:
                cli.main()
    finally:
        mp.undo()
    code = exc.value.code if isinstance(exc.value.code, int) else (0 if exc.value.code is None else 1)
    return code, out.getvalue(), err.getvalue()


def harmonic_tone(seconds: float, f0: float = 150.0, amp: float = 0.3, vibrato: float = 0.0) -> np.ndarray:
    """A voice-like tone: 20 harmonics with a 1/k falloff (optional 5 Hz vibrato, as a fraction)."""
    t = np.arange(int(seconds * SR)) / SR
    freq = f0 * (1 + vibrato * np.sin(2 * np.pi * 5 * t))
    phase = 2 * np.pi * np.cumsum(freq) / SR
    x = sum(np.sin(k * phase) / k for k in range(1, 21))
    return (amp * x / np.max(np.abs(x))).astype(np.float32)


def write_wav(path, audio: np.ndarray, rate: int = SR):
    sf.write(str(path), audio, rate)
    return path
