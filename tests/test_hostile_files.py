"""Files from strangers (issue 20): checkpoints inside the pickle allow-list that would still
exhaust the machine, bundles with hostile manifests, links and external data, audio headers with
absurd rates, and paths that look like rich markup. Every case ends in one line, exit 2; the
checkpoint cases also stay under 500 MB of memory, measured in a child process."""

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import soundfile as sf
import torch

from rtsvc.backends.bundle import MANIFEST, read_bundle, write_manifest
from rtsvc.errors import UserError
from tests.cli_helpers import harmonic_tone, run_cli, write_wav
from tests.test_bundle import make_fake_bundle
from tests.tiny_models import make_tiny_dit_checkpoint

ROOT = Path(__file__).resolve().parents[1]
MEMORY_LIMIT_MB = 500


def one_line_error(code: int, err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def run_rtsvc_measured(args: list, timeout: float = 120.0) -> tuple[int, str, float]:
    """`rtsvc ARGS` in a child process of a child (so RUSAGE_CHILDREN is that one process's
    peak): (exit code, stderr, peak resident MB). A hang is a failure (TimeoutExpired)."""
    script = ("import resource, subprocess, sys\n"
              "r = subprocess.run([sys.executable, 'cli.py', *sys.argv[1:]], capture_output=True, text=True,"
              f" timeout={timeout})\n"
              "sys.stderr.write(r.stderr)\n"
              "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout + 30)
    code, peak_kb = done.stdout.split()
    return int(code), done.stderr, int(peak_kb) / 1024


# --- checkpoints -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = make_tiny_dit_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")
    return torch.load(path, weights_only=False)


def with_size(ckpt: dict, **size) -> dict:
    ckpt = {**ckpt, "hyper_parameters": json.loads(json.dumps(ckpt["hyper_parameters"]))}
    ckpt["hyper_parameters"]["cfg"]["model"]["cfg"].update(size)
    return ckpt


def with_tensor(ckpt: dict, key: str, tensor: torch.Tensor) -> dict:
    return {**ckpt, "state_dict": {**ckpt["state_dict"], key: tensor}}


def nested_list_pickle(depth: int) -> bytes:
    """A list nested `depth` deep, written opcode by opcode (pickling it would overflow the stack)."""
    return b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."


def torch_zip_with_pickle(path: Path, data: bytes) -> Path:
    """A torch.save zip file whose data.pkl is replaced by `data`."""
    buffer = io.BytesIO()
    torch.save([], buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, data if info.filename.endswith("/data.pkl") else src.read(info))
    return path


def legacy_tar_with_fifo(path: Path) -> Path:
    """torch's pre-2018 tar format, its `storages` member a FIFO (torch extracts it, then opens it)."""
    with tarfile.open(path, "w") as tar:
        for name in ("sys_info", "pickle", "tensors"):
            data = pickle.dumps({})
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        fifo = tarfile.TarInfo("storages")
        fifo.type = tarfile.FIFOTYPE
        tar.addfile(fifo)
    return path


def hostile_checkpoints(ckpt: dict, folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, words its one-line refusal must hold)."""
    cases = {}

    def save(name: str, obj) -> Path:
        torch.save(obj, folder / f"{name}.ckpt")
        return folder / f"{name}.ckpt"

    # the case: dim 4096 (and depth 4) in a small file built a 5 GB model before any check
    cases["big_config"] = save("big_config", with_size(ckpt, dim=4096, depth=4)), "depth=4"
    cases["big_width"] = save("big_width", with_size(ckpt, dim=4096)), "dim=4096"
    cases["big_ff"] = save("big_ff", with_size(ckpt, ff_mult=512)), "in the file"
    huge = torch.zeros(1).expand(64, 10**11)  # 4 bytes on disk, 25 TB as claimed
    cases["stride_0"] = save("stride_0", with_tensor(ckpt, "model.transformer.cond_embed.cvec_embed.weight",
                                                     huge)), "stride-0"
    base = torch.randn(3 * 4096)  # two weights of the right shapes over overlapping bytes of one storage
    shared = with_tensor(ckpt, "model.transformer.output.weight", base[:8192].view(128, 64))
    shared = with_tensor(shared, "model.transformer.input_embed.proj.weight", base[4096:].view(64, 128))
    cases["overlap"] = save("overlap", shared), "share storage bytes"
    cases["transposed"] = save("transposed", with_tensor(ckpt, "model.transformer.output.weight",
                                                         torch.randn(64, 128).t())), "non-contiguous"
    cases["nested"] = torch_zip_with_pickle(folder / "nested.ckpt", nested_list_pickle(100_000)), "nested"
    cases["tar_fifo"] = legacy_tar_with_fifo(folder / "tar_fifo.ckpt"), "legacy tar checkpoint"
    os.mkfifo(folder / "fifo.ckpt")
    cases["fifo"] = folder / "fifo.ckpt", "not a regular file"
    return cases


@pytest.mark.slow
def test_hostile_checkpoints_are_one_line_exit_2_in_bounded_memory(tiny_ckpt, tmp_path):
    cases = hostile_checkpoints(tiny_ckpt, tmp_path)
    peaks = {}
    for name, (path, words) in cases.items():
        code, err, peaks[name] = run_rtsvc_measured(["export", path, "--out", tmp_path / "x.rtsvc"])
        line = err.strip().splitlines()[-1]  # export's progress line is above it
        assert code == 2 and line.startswith("error: ") and "Traceback" not in err, (name, err)
        assert words in line, (name, line)
        assert peaks[name] < MEMORY_LIMIT_MB, (name, peaks[name])
    print("peak resident MB per case:", {k: round(v) for k, v in peaks.items()})


@pytest.mark.parametrize("name", ["big_config", "big_width", "big_ff", "stride_0", "overlap", "transposed",
                                  "nested", "tar_fifo", "fifo"])
def test_hostile_checkpoint_refusals_name_the_problem(tiny_ckpt, tmp_path, name):
    """The same files in-process (fast): load_dit raises one UserError line."""
    from rtsvc.models.loading import load_dit

    path, words = hostile_checkpoints(tiny_ckpt, tmp_path)[name]
    with pytest.raises(UserError, match=words) as err:
        load_dit(path)
    assert "\n" not in str(err.value)


def test_a_real_checkpoint_still_loads_after_the_checks(tiny_ckpt, tmp_path):
    from rtsvc.models.loading import load_dit

    path = tmp_path / "ok.ckpt"
    torch.save(tiny_ckpt, path)
    loaded = load_dit(path)
    assert loaded.config.dim == 64 and loaded.config.depth == 2


# --- bundles -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A real tiny V2 bundle and a V3 one (exported once for the module) and a pretrained dir."""
    from rtsvc.export.onnx_export import export_bundle

    from tests.tiny_encoders import make_tiny_pretrained_dir
    from tests.upstream.fixtures import make_v3_head

    root = tmp_path_factory.mktemp("bundles")
    pretrained = make_tiny_pretrained_dir(root / "pretrained")
    v2 = export_bundle(make_tiny_dit_checkpoint(root / "v2.ckpt"), root / "v2.rtsvc", pretrained).path
    v3_ckpt, _ = make_v3_head(root / "v3.ckpt", dim=64, depth=1)
    v3 = export_bundle(v3_ckpt, root / "v3.rtsvc", pretrained).path
    wav = write_wav(root / "in.wav", harmonic_tone(0.5))
    return {"v2": v2, "v3": v3, "pretrained": pretrained, "wav": wav}


def edited_copy(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    manifest = json.loads((dst / MANIFEST).read_text())
    edit(manifest)
    (dst / MANIFEST).write_text(json.dumps(manifest))
    return dst


MANIFEST_EDITS = {  # the seven tracebacks, and their neighbours
    "cfg_skip_layers_text": (lambda m: m["dit"].update(cfg_skip_layers="abc"), '"dit.cfg_skip_layers"'),
    "default_speaker_list": (lambda m: m["defaults"].update(speaker=[]), '"defaults.speaker"'),
    "speaker_index_1e30": (lambda m: m["speakers"].update(alice=1e30), '"speakers" must map'),
    "speaker_index_huge_int": (lambda m: m["speakers"].update(alice=10**30), '"speakers" must map'),
    "family_list": (lambda m: m.update(family=[]), '"family" must be "v2" or "v3"'),
    "family_v3_on_v2_graph": (lambda m: m.update(family="v3"), "is not a v3 DiT interface"),
    "student_text": (lambda m: m.update(student="x"), '"student" must be an object'),
    "steps_text": (lambda m: m["defaults"].update(steps="many"), '"defaults.steps" must be a number'),
    "hop_length_huge": (lambda m: m["audio"].update(hop_length=10**12), '"audio.hop_length" is'),
    "inputs_text": (lambda m: m["dit"].update(inputs="abc"), '"dit.inputs" must be a list'),
    "export_list": (lambda m: m.update(export=[]), '"export" must be an object'),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_EDITS))
def test_hostile_manifests_are_one_line_exit_2(exported, tmp_path, capsys, monkeypatch, case):
    edit, words = MANIFEST_EDITS[case]
    bundle = edited_copy(exported["v2"], tmp_path / "b.rtsvc", edit)
    code, _, err = run_cli(["convert", exported["wav"], tmp_path / "o.wav", "--model", bundle,
                            "--pretrained-dir", exported["pretrained"], "--f0", "pyworld", "--device", "cpu"],
                           capsys, monkeypatch)
    line = one_line_error(code, err)
    assert "manifest.json is malformed" in line and words in line, line


def test_family_v2_on_a_v3_graph_is_refused_even_with_matching_inputs(exported, tmp_path, capsys,
                                                                        monkeypatch):
    """A manifest edited consistently (family and dit.inputs both say V2) over a V3 graph: the graph
    itself takes V3 inputs, which a V2 bundle never feeds."""
    from rtsvc.backends.bundle import DIT_INPUTS

    bundle = edited_copy(exported["v3"], tmp_path / "b.rtsvc",
                         lambda m: (m.update(family="v2"), m["dit"].update(inputs=list(DIT_INPUTS))))
    code, _, err = run_cli(["convert", exported["wav"], tmp_path / "o.wav", "--model", bundle,
                            "--pretrained-dir", exported["pretrained"], "--f0", "pyworld", "--device", "cpu"],
                           capsys, monkeypatch)
    line = one_line_error(code, err)
    assert "dit.onnx takes inputs" in line and "bad_cvec" in line and "does not match the graph" in line


def test_a_bundle_file_linking_outside_is_refused(tmp_path):
    bundle = make_fake_bundle(tmp_path / "fake.rtsvc")
    outside = tmp_path / "secret.onnx"
    shutil.copyfile(bundle / "dit.onnx", outside)
    (bundle / "dit.onnx").unlink()
    (bundle / "dit.onnx").symlink_to(outside)  # same bytes, same hash: only the link is wrong
    with pytest.raises(UserError, match="dit.onnx is a link to a file outside the bundle") as err:
        read_bundle(bundle)
    assert "\n" not in str(err.value)
    inside = make_fake_bundle(tmp_path / "ok.rtsvc")  # a link within the bundle is fine
    (inside / "extra" / "weights.bin").rename(inside / "weights.real")
    (inside / "extra" / "weights.bin").symlink_to(inside / "weights.real")
    manifest = json.loads((inside / MANIFEST).read_text())
    write_manifest(inside, {k: v for k, v in manifest.items() if k not in ("files", "format_version")})
    assert read_bundle(inside).has("extra/weights.bin")


@pytest.mark.parametrize("location", ["/etc/hostname", "../secret.bin", "unlisted.bin"])
def test_onnx_external_data_outside_the_bundle_is_refused(exported, tmp_path, location):
    """ONNX Runtime reads whatever path a graph's external data names; the bundle checks it first."""
    from rtsvc.backends.onnx_backend import OnnxBackend

    bundle = tmp_path / "b.rtsvc"
    shutil.copytree(exported["v2"], bundle)
    (tmp_path / "secret.bin").write_bytes(b"\0" * 4096)
    (bundle / "unlisted.bin").write_bytes(b"\0" * 4096)
    model = onnx.load(str(bundle / "dit.onnx"))
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    onnx.save(model, str(bundle / "dit.onnx"))
    manifest = json.loads((bundle / MANIFEST).read_text())
    body = {k: v for k, v in manifest.items() if k not in ("files", "format_version")}
    write_manifest(bundle, body)  # hashes re-written: only the external reference is wrong
    if location == "unlisted.bin":  # present in the folder, but not a manifest-listed (hashed) file
        files = json.loads((bundle / MANIFEST).read_text())
        del files["files"]["unlisted.bin"]
        (bundle / MANIFEST).write_text(json.dumps(files))
    with pytest.raises(UserError, match="reads external data from") as err:
        OnnxBackend.open(bundle, device="cpu")
    assert location in str(err.value) and "\n" not in str(err.value)


# --- audio headers, fake audio, markup in paths --------------------------------------------------

def wav_claiming_rate(path: Path, rate: int) -> Path:
    sf.write(str(path), harmonic_tone(0.5), 44100, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"fmt "
    data[24:28] = rate.to_bytes(4, "little")
    data[28:32] = (rate * 2).to_bytes(4, "little")  # byte rate, mono 16-bit
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("rate", [1, 3999, 384001, 10**9])
def test_absurd_sample_rates_are_refused_in_one_line(tmp_path, capsys, monkeypatch, rate):
    wav = wav_claiming_rate(tmp_path / "in.wav", rate)
    assert sf.info(str(wav)).samplerate == rate
    code, _, err = run_cli(["convert", wav, tmp_path / "out.wav"], capsys, monkeypatch)
    line = one_line_error(code, err)
    assert f"sample rate of {rate} Hz" in line and "4-384 kHz" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.wav"]  # nothing written, no partial


def test_sane_rates_at_both_ends_still_convert(tmp_path, capsys, monkeypatch):
    for rate in (4000, 384000):
        wav = write_wav(tmp_path / f"in{rate}.wav", harmonic_tone(0.5)[: rate // 2], rate)
        code, _, err = run_cli(["convert", wav, tmp_path / f"out{rate}.wav"], capsys, monkeypatch)
        assert code == 0, err


def test_a_text_file_named_mp3_is_called_not_audio_without_decoder_noise(tmp_path):
    """libsndfile's MP3 decoder prints "Note: Illegal Audio-MPEG-Header" on the process's stderr,
    then soundfile says the file does not exist: one line, from a real process, says what it is."""
    fake = tmp_path / "song.mp3"
    fake.write_text("this is a text file, not a recording\n" * 20)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "cli.py", "convert", str(fake), str(tmp_path / "o.wav")],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    line = one_line_error(done.returncode, done.stderr)
    assert "not readable audio" in line and "does not exist" not in line and "Note:" not in done.stderr


def test_paths_that_look_like_markup_print_literally(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "take[" / "b]"  # the output path reads "...take[/b]/out.wav": a closing tag
    folder.mkdir(parents=True)
    wav = write_wav(folder / "in.wav", harmonic_tone(0.5))
    code, out, err = run_cli(["convert", wav, folder / "out.wav"], capsys, monkeypatch)
    assert code == 0, err
    assert f"wrote {folder / 'out.wav'} (" in " ".join((out + err).split("\n"))


@pytest.mark.slow
def test_prepare_prints_marked_up_paths_literally(tmp_path, capsys, monkeypatch):
    from tests.tiny_encoders import make_tiny_pretrained_dir

    pretrained = make_tiny_pretrained_dir(tmp_path / "pretrained")
    data = tmp_path / "d[" / "x]" / "data"
    speaker = data / "[bold]alice"
    speaker.mkdir(parents=True)
    for i in range(2):
        write_wav(speaker / f"take{i}.wav", np.concatenate([harmonic_tone(2.5), np.zeros(22050, np.float32)]))
    (speaker / "bad[red]x.wav").write_text("not audio")  # skipped, with its path in the message
    code, out, err = run_cli(["prepare", data, "--pretrained-dir", pretrained, "--f0", "pyworld",
                              "--family", "v3", "--device", "cpu", "--workers", "1"], capsys, monkeypatch)
    text = out + err
    assert code == 0, text
    assert "[bold]alice" in text and "bad[red]x.wav" in text and str(data) in text.replace("\n", "")
