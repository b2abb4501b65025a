"""`rtsvc bench --streams`: simulated real-time clients through a real loopback server."""

import pytest

from rtsvc.bench.streams import StreamsRun, largest_held, parse_counts, run_streams
from rtsvc.engine import StreamConfig
from rtsvc.errors import UserError
from rtsvc.serve.server import dsp_source
from rtsvc.settings import Knobs
from tests.cli_helpers import run_cli


def test_two_dsp_clients_stream_in_real_time_and_every_block_is_answered():
    config = StreamConfig(block_ms=100.0)
    run = run_streams(dsp_source(), 2, 1, config, Knobs(gate_db=-120.0), seconds=1.0)
    print(run)
    period_ms = 9 * 512 * 1000 / 44100  # 100 ms -> 9 mel frames
    assert run.block_ms == pytest.approx(period_ms) and run.blocks == 2 * int(1.0 / (period_ms / 1000))
    assert 0 < run.p50_ms < run.p99_ms < 60_000 and run.mean_batch == 1.0 and run.cpu_ms > 0
    assert run.late <= run.blocks  # timing depends on the machine's load: not asserted


def test_largest_held_per_max_batch():
    def row(n, b, late):
        return StreamsRun(n, b, 150.0, 100, late, 50.0, 90.0, 1.0, 10.0, 1.0)

    rows = [row(1, 1, 0), row(1, 8, 0), row(2, 1, 5), row(2, 8, 1), row(4, 8, 30)]
    assert largest_held(rows) == {1: 1, 8: 2}
    assert row(1, 1, 0).capacity(2) == pytest.approx(30.0)


def test_bad_counts_are_one_line_errors(capsys, monkeypatch):
    assert parse_counts("1, 2,8", "--streams") == [1, 2, 8]
    with pytest.raises(UserError, match="at least 1"):
        parse_counts("0,2", "--streams")
    code, _, err = run_cli(["bench", "--streams", "two"], capsys, monkeypatch)
    assert code == 2 and "--streams must be a comma-separated list of whole numbers" in err
