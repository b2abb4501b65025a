"""What `train` and `distill` show while they run: a bar (loss, steps/s, ETA) on a terminal, plain lines
in a log file or CI, where a bar would only be printed once, at the end."""

import math
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

PLAIN_EVERY_S = 30.0  # without a terminal: at most one line per this many seconds (and the last step)


def loss_text(loss: float) -> str:
    """'loss 0.1234', or nothing before the first logged step (there is no loss yet to show)."""
    return "" if math.isnan(loss) else f"loss {loss:.4f}"


def eta_text(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class TrainProgress:
    """Used like rich's `Progress` (`add_task`, `update`, a context manager) by the training loops.

    `enabled` is False on other ranks and with progress=False: then it prints nothing. On a
    terminal it draws the bar; otherwise it prints `name step N/M  loss L  S steps/s  ETA h:mm:ss`
    once a logged loss exists, at most every `plain_every_s` and at the last step.
    """

    def __init__(self, name: str, enabled: bool, console: Console | None = None,
                 plain_every_s: float | None = None):
        self.name = name
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self.plain = enabled and not self.console.is_terminal
        self.plain_every_s = PLAIN_EVERY_S if plain_every_s is None else plain_every_s
        self.bar = Progress(
            TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[loss]}"),
            TextColumn("{task.fields[sps]:.2f} steps/s"), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, disable=not enabled or self.plain, transient=False,
        )
        self.total = self.step = 0
        self.loss, self.sps = math.nan, 0.0
        self._new_loss = False
        self._last_line = -math.inf

    def say(self, text: str) -> None:
        """One line above the bar (or in the log), e.g. what is being trained."""
        if self.enabled:
            self.console.print(text, highlight=False, soft_wrap=True)

    def __enter__(self) -> "TrainProgress":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def add_task(self, description: str, total: int, completed: int = 0, loss: float = math.nan,
                 sps: float = 0.0):
        self.total, self.step, self.loss, self.sps = total, completed, loss, sps
        return self.bar.add_task(description, total=total, completed=completed, loss=loss_text(loss), sps=sps)

    def update(self, task, completed: int | None = None, loss: float | None = None,
               sps: float | None = None) -> None:
        fields = {}
        if loss is not None:
            self.loss, self._new_loss = loss, True
            fields["loss"] = loss_text(loss)
        if sps is not None:
            self.sps = fields["sps"] = sps
        if completed is not None:
            self.step = fields["completed"] = completed
        self.bar.update(task, **fields)
        if self.plain and completed is not None and self._new_loss:
            self._plain_line()

    def _plain_line(self) -> None:
        now = time.monotonic()
        if now - self._last_line < self.plain_every_s and self.step < self.total:
            return
        self._last_line, self._new_loss = now, False
        eta = (self.total - self.step) / self.sps if self.sps > 0 else math.inf
        self.console.print(f"{self.name} step {self.step}/{self.total}  {loss_text(self.loss)}  "
                           f"{self.sps:.2f} steps/s  ETA {eta_text(eta)}", highlight=False, soft_wrap=True)
