"""One table of knobs: a row gives the validator, the protocol's checks, the CLI options and the
page's controls; CLI errors name the flag typed; every command's help fits 80 columns whole."""

import re

import pytest
import typer
from rtsvc.commands.cli_options import knob_options, tidy_command
from typer.testing import CliRunner

from rtsvc.commands import cli
from rtsvc.errors import UserError
from rtsvc.serve.protocol import ProtocolError, parse_set, parse_start
from rtsvc.settings import (
    KNOB_TABLE,
    MAX_PITCH_SHIFT,
    MAX_STEPS,
    Knob,
    Knobs,
    knob_spec,
    knobs_class,
    validate_knobs,
)
from tests.cli_helpers import run_cli

REVERB = Knob("reverb_mix", float, 0.25, "reverb", "Test-only: dry/wet reverb mix", ("--reverb",), 0.0, 1.0,
              step=0.05, basic=True)
TABLE = (*KNOB_TABLE, REVERB)


def test_a_new_knob_is_one_row():
    knobs = knobs_class(TABLE)
    assert knobs().reverb_mix == 0.25 and knobs_class(KNOB_TABLE) is Knobs  # the dataclass
    with pytest.raises(UserError, match="reverb_mix must be between 0 and 1, got 2"):
        validate_knobs(knobs(reverb_mix=2.0), TABLE)  # the validator
    assert parse_set({"type": "set", "reverb_mix": 0.5}, TABLE) == {"reverb_mix": 0.5}  # the protocol
    with pytest.raises(ProtocolError, match="reverb_mix must be a finite number, got '0.5'"):
        parse_set({"type": "set", "reverb_mix": "0.5"}, TABLE)
    start = parse_start({"type": "start", "sample_rate": 48000, "reverb_mix": 1}, TABLE)
    assert start.knobs == {"reverb_mix": 1.0}
    with pytest.raises(ProtocolError, match="unknown"):
        parse_set({"type": "set", "reverb_mix": 0.5})  # not in the real table
    spec = {c["name"]: c for c in knob_spec("v3", table=TABLE)}  # the page
    assert spec["reverb_mix"]["maximum"] == 1.0 and spec["reverb_mix"]["basic"] is True

    app = typer.Typer(rich_markup_mode=None)  # the CLI options
    seen = {}

    @app.command()
    @knob_options(table=TABLE)
    def run(name: str = "x", knobs=None, typed=None) -> None:
        seen.update(knobs=knobs, typed=typed)

    tidy_command(typer.main.get_command(app))
    runner = CliRunner()
    result = runner.invoke(app, ["--reverb", "0.75", "--pitch", "2"])
    assert result.exit_code == 0, result.output
    assert seen["knobs"].reverb_mix == 0.75 and seen["knobs"].pitch_shift == 2.0
    assert seen["typed"] == {"reverb_mix": 0.75, "pitch_shift": 2.0}
    help_text = runner.invoke(app, ["--help"], env={"COLUMNS": "80"}).output
    assert "--reverb" in help_text and "Test-only: dry/wet reverb mix (0-1). Default: 0.25." in \
        " ".join(help_text.split())
    failed = runner.invoke(app, ["--reverb", "3"])
    assert isinstance(failed.exception, UserError) and str(failed.exception) == \
        "--reverb must be between 0 and 1, got 3"


def test_ranges_agree_between_validator_cli_and_page():
    spec = {c["name"]: c for c in knob_spec("v3")}
    pitch = spec["pitch_shift"]
    assert (pitch["minimum"], pitch["maximum"]) == (-MAX_PITCH_SHIFT, MAX_PITCH_SHIFT) == (-36, 36)
    assert spec["steps"]["maximum"] == MAX_STEPS == 64
    assert "speaker" in spec and "seed" not in spec  # seed has no control on the page
    assert "formant_shift" in spec and "formant_shift" in {c["name"] for c in knob_spec("dsp")}  # every voice


@pytest.mark.parametrize("args,message", [
    (["--pitch", "100"], "error: --pitch must be within ±36 semitones, got 100"),
    (["--formant", "3"], "error: --formant must be between 0.5 and 2, got 3"),
    (["--gate", "5"], "error: --gate must be between -120 and 0 dBFS, got 5"),
    (["--denoise", "on"], "error: --denoise must be one of off, deepfilternet, rnnoise, got 'on'"),
])
def test_cli_knob_errors_name_the_flag_typed(args, message, capsys, monkeypatch):
    code, _, err = run_cli(["serve", *args], capsys, monkeypatch)
    assert code == 2 and err.strip() == message


@pytest.mark.parametrize("command", ["", *typer.main.get_command(cli.app).commands])
def test_help_fits_80_columns_and_every_flag_is_whole(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = run_cli([c for c in (command, "--help") if c], capsys, monkeypatch)
    assert code == 0
    assert all(len(line) <= 80 or " " not in line.strip() for line in out.splitlines()), out
    flags = set(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", out))
    group = typer.main.get_command(cli.app)
    params = group.commands[command].params if command else group.params
    for param in params:
        for flag in [*param.opts, *param.secondary_opts]:
            if flag.startswith("--"):
                assert flag in flags, (command, flag)
    assert "…" not in out and "<bool>" not in out and "issue 1" not in out.lower()
