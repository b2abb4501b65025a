"""Single-key commands while `rtsvc live` runs (pitch, formant, gate, gains, noise suppression, quit)."""

import os
import select
import sys
import threading

from rtsvc.errors import UserError
from rtsvc.live.state import LiveState
from rtsvc.settings import RuntimeSettings
from rtsvc.voice import Voice

DENOISE_CYCLE = ("off", "deepfilternet", "rnnoise")  # the `n` key steps through these


def key_help(voice: Voice) -> str:
    """The keys that apply to `voice` (formant only for the DSP voice); lowercase lowers, uppercase raises."""
    formant = "f/F formant -/+0.05, " if getattr(voice, "uses_formant", False) else ""
    return ("keys (lowercase lowers, uppercase raises): up/down or +/- pitch ±1 semitone, 0 pitch 0, "
            f"{formant}g/G gate -/+5 dB, i/I input gain -/+1 dB, o/O output gain -/+1 dB, "
            "n noise suppression off/deepfilternet/rnnoise, q quit")


class KeyReader:
    """Single-key commands from a terminal (cbreak mode), applied to the runtime settings."""

    STEPS = {"+": ("pitch_shift", 1), "=": ("pitch_shift", 1), "-": ("pitch_shift", -1),
             "\x1b[A": ("pitch_shift", 1), "\x1b[B": ("pitch_shift", -1),
             "f": ("formant_shift", -0.05), "F": ("formant_shift", 0.05),
             "g": ("gate_db", -5), "G": ("gate_db", 5),
             "i": ("input_gain_db", -1), "I": ("input_gain_db", 1),
             "o": ("output_gain_db", -1), "O": ("output_gain_db", 1)}

    def __init__(self, settings: RuntimeSettings, state: LiveState, voice: Voice | None = None):
        self.settings, self.state = settings, state
        self.formant = voice is None or getattr(voice, "uses_formant", False)  # keys only where they apply
        self.message = ""
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        """Wait for the reader to put the terminal back (it polls the stop flag every 0.1 s)."""
        if self._thread.is_alive():
            self._thread.join(timeout=1.0)

    def apply(self, key: str) -> None:
        if key in ("q", "Q"):
            self.state.stop.set()
            return
        if key == "0":
            self.settings.update(pitch_shift=0.0)
            return
        if key == "n":
            current = self.settings.snapshot().denoise
            following = DENOISE_CYCLE[(DENOISE_CYCLE.index(current) + 1) % len(DENOISE_CYCLE)]
            self.settings.update(denoise=following)
            return
        if key not in self.STEPS or (key in "fF" and not self.formant):
            return
        name, step = self.STEPS[key]
        value = round(getattr(self.settings.snapshot(), name) + step, 3)
        try:
            self.settings.update(**{name: value})
            self.message = ""
        except UserError as err:
            self.message = str(err)

    def _run(self) -> None:
        import termios
        import tty

        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd)
        try:
            tty.setcbreak(fd)
            while not self.state.stop.is_set():
                if not select.select([fd], [], [], 0.1)[0]:
                    continue
                # os.read, not sys.stdin.read(1): the text layer buffers the rest of an arrow key's
                # escape sequence, where select() cannot see it.
                for key in split_keys(os.read(fd, 64).decode(errors="ignore")):
                    self.apply(key)
        finally:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def split_keys(data: str) -> list[str]:
    """Keys in what one terminal read returned: single characters, arrows as ESC [ A (or ESC O A)."""
    keys, i = [], 0
    while i < len(data):
        if data[i] == "\x1b" and i + 2 < len(data) and data[i + 1] in "[O":
            keys.append("\x1b[" + data[i + 2])
            i += 3
        else:
            keys.append(data[i])
            i += 1
    return keys
