"""Test-wide settings (no network, deterministic threads) and the tiny models every module shares."""

import os
import shutil
from pathlib import Path

import pytest
from hypothesis import settings

# CI draws the same fuzz examples on every run (a red CI names a case anyone can rerun); a developer's
# run draws new ones each time (CI=true pytest reproduces CI's)
settings.register_profile("ci", derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny
    models gain nothing from intra-op threads, and on a busy 2-core machine spinning threads make a
    training step several times slower (measured 6 s vs 45 s for 30 steps)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _listing(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def _shared_read_only(root: Path):
    """Yield `root` to every test of the session, then check that none of them changed it: a test that
    must change a pretrained folder copies it first (shutil.copytree into its tmp_path)."""
    before = _listing(root)
    yield root
    assert _listing(root) == before, f"a test changed the shared {root.name}; copy it before changing it"


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory):
    """The upstream pretrained layout (ContentVec, Whisper, NSF-HiFiGAN, RMVPE) with tiny random
    weights, built once per session (~3.5 s and 95 MB each time it was built per module). Read-only."""
    from tests.tiny_encoders import make_tiny_pretrained_dir

    yield from _shared_read_only(make_tiny_pretrained_dir(tmp_path_factory.mktemp("shared") / "pretrained"))


@pytest.fixture(scope="session")
def tiny_pretrained_v3(tmp_path_factory):
    """The same folder without Whisper: complete for a V3 model. Read-only."""
    from tests.tiny_encoders import make_tiny_pretrained_dir

    root = tmp_path_factory.mktemp("shared") / "pretrained-v3"
    yield from _shared_read_only(make_tiny_pretrained_dir(root, whisper=False))


# --- the fast subset: `pytest -m "not slow"` (README, Tests) -----------------------------------------
# Whole modules that train, distill, export, drive Chromium, PulseAudio or Ray, and single tests that
# took over ~2 s on the 2-core container; CI runs everything. tests/test_fast_subset.py checks that
# every name listed here still exists.
SLOW_MODULES = {
    "test_train", "test_v3_train", "test_distill", "test_export", "test_v3_export", "test_live",
    "test_web_page", "test_ray_serve", "test_cpu_cost", "test_upstream_parity",
}
SLOW_TESTS = {
    "test_batch": {"test_v3_batches_equal_one_at_a_time_and_rescale_runs_alone",
                   "test_batched_blocks_equal_one_at_a_time_per_stream",
                   "test_batched_server_equals_one_at_a_time_server_per_client"},
    "test_cli_options": {"test_bench_passes_providers_and_gap_uses_the_offline_model"},
    "test_convert": {"test_stream_file_reads_block_by_block_and_equals_streaming_the_whole_clip"},
    "test_denoise": {"test_engine_denoises_its_input_and_reports_the_added_latency",
                     "test_reset_restarts_stream", "test_snr_improves_and_delay_is_constant"},
    "test_dsp_voice": {"test_streaming_is_close_to_offline",
                       "test_streaming_defaults_keep_the_pitch_of_low_and_high_voices"},
    "test_encoders": {"test_whisper_second_to_last_hidden_state_matches_transformers",
                      "test_whisper_longer_than_30s_is_encoded_in_30s_pieces"},
    "test_feature_batch": {"test_lockstep_caches_equal_caches_driven_alone"},
    "test_fuzz_checkpoint": {"test_any_checkpoint_metadata_loads_or_gives_one_line_user_error"},
    "test_model_voice_stream": {"test_streaming_vs_offline_gap_of_the_tiny_model",
                                "test_streaming_voice_equals_the_non_incremental_path",
                                "test_concurrent_f0_voice_output_is_identical",
                                "test_a_shorter_dit_context_draws_the_same_noise_for_the_same_frames",
                                "test_vocoder_context_sets_the_frames_vocoded",
                                "test_streaming_voice_draws_each_vocoder_noise_sample_once_and_sounds_the_same"},
    "test_prepare": {"test_prepare_resumes_and_redoes_only_changed_work"},
    "test_safetensors_voice": {"test_cli_export_then_convert_is_bit_identical_to_the_checkpoint",
                               "test_any_value_at_any_metadata_field_loads_or_is_one_line",
                               "test_a_student_keeps_its_marker_and_output",
                               "test_v3_lora_carried_is_exact_and_folded_is_plain_v3"},
    "test_providers": {"test_an_accelerator_that_fails_on_the_graphs_falls_back_to_cpu_and_says_so",
                       "test_an_accelerator_that_starts_runs_the_bundle"},
    "test_server": {"test_eight_concurrent_clients_get_identical_independent_streams",
                    "test_memory_stays_flat_over_200_connect_disconnect_cycles",
                    "test_live_set_changes_gain_and_pitch_mid_stream",
                    "test_model_voice_serves_several_clients_with_their_own_speakers",
                    "test_pitch_shift_12_doubles_output_f0",
                    "test_abrupt_disconnects_mid_stream_leave_the_server_serving",
                    "test_round_trip_accounts_for_every_sample"},
    "test_server_hardening": {"test_serve_cli_passes_the_overload_options_on",
                              "test_overload_keeps_every_clients_latency_bounded_and_says_what_it_dropped",
                              "test_a_client_that_never_reads_is_dropped_after_the_send_timeout"},
    "test_v3_voice": {"test_v3_convert_through_the_cli", "test_v3_voice_guidance_knobs_change_the_output",
                      "test_v3_voice_benches"},
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module in SLOW_MODULES or item.originalname in SLOW_TESTS.get(module, ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def pulse():
    """A private PulseAudio with null sinks `mic` and `speaker` (the live rig; tests/test_live.py)."""
    if shutil.which("pulseaudio") is None:
        pytest.skip("pulseaudio is not installed (apt-get install pulseaudio libasound2-plugins)")
    from rtsvc.bench.loopback import PulseServer

    with PulseServer(("mic", "speaker")) as server:
        yield server
