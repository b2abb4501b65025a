"""Nothing lost (issue 20): `export` replaces only a folder that provably is its bundle, `convert`'s
temporary output is never its input and is gone after SIGTERM, `prepare` never merges two
recordings into one cache name, and the wheel carries the web page."""

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from rtsvc.training.prepare import CACHE_DIR, prepare_dataset

from rtsvc.backends.bundle import MANIFEST, replaceable_bundle_problem
from tests.cli_helpers import harmonic_tone, run_cli, write_wav
from tests.test_bundle import make_fake_bundle
from tests.test_prepare import SETTINGS, cheap_extract
from tests.tiny_encoders import make_tiny_pretrained_dir
from tests.tiny_models import make_tiny_dit_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# --- export --out ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    return make_tiny_dit_checkpoint(root / "tiny.ckpt"), make_tiny_pretrained_dir(root / "pretrained")


def web_project(folder: Path) -> Path:
    (folder / "src").mkdir(parents=True)
    (folder / MANIFEST).write_text(json.dumps({"name": "my web app", "short_name": "app", "icons": []}))
    (folder / "src" / "app.js").write_text("console.log('months of work');\n")
    return folder


def bundle_with_notes(folder: Path) -> Path:
    make_fake_bundle(folder)
    (folder / "notes.txt").write_text("my notes about this voice")
    return folder


@pytest.mark.parametrize("make, words", [(web_project, "not an rtsvc bundle"),
                                         (bundle_with_notes, "holds notes.txt")])
def test_export_never_replaces_a_folder_that_is_not_only_its_bundle(tiny, tmp_path, capsys, monkeypatch,
                                                                    make, words):
    ckpt, pretrained = tiny
    out = make(tmp_path / "P")
    before = tree(out)
    code, _, err = run_cli(["export", ckpt, "--out", out, "--pretrained-dir", pretrained], capsys,
                           monkeypatch)
    last = err.strip().splitlines()[-1]  # the progress bar is above it
    assert code == 2 and last.startswith("error: ") and "Traceback" not in err, err
    assert "will not replace" in last and words in last, last
    assert tree(out) == before


def test_export_replaces_its_own_bundle_and_leaves_lookalike_folders_alone(tiny, tmp_path, capsys,
                                                                           monkeypatch):
    ckpt, pretrained = tiny
    out = tmp_path / "voice.rtsvc"
    sibling = tmp_path / ".voice.rtsvc.partial"  # the old fixed work folder name: a user's folder here
    sibling.mkdir()
    (sibling / "keep.txt").write_text("mine")
    for _ in range(2):  # the second export replaces the first bundle
        code, _, err = run_cli(["export", ckpt, "--out", out, "--pretrained-dir", pretrained], capsys,
                               monkeypatch)
        assert code == 0, err
    assert replaceable_bundle_problem(out) is None
    assert (sibling / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".voice.rtsvc.partial", "voice.rtsvc"]


def test_replaceable_bundle_problem_names_what_is_in_the_way(tmp_path):
    assert replaceable_bundle_problem(make_fake_bundle(tmp_path / "ok.rtsvc")) is None
    linked = make_fake_bundle(tmp_path / "linked.rtsvc")
    (linked / "elsewhere").symlink_to(tmp_path)
    assert "holds elsewhere" in replaceable_bundle_problem(linked)
    (tmp_path / "alias.rtsvc").symlink_to(tmp_path / "ok.rtsvc")
    assert replaceable_bundle_problem(tmp_path / "alias.rtsvc") == "it is not a plain folder"


# --- convert's temporary output ------------------------------------------------------------------

def test_convert_input_named_like_the_old_temporary_file_survives(tmp_path, capsys, monkeypatch):
    """`rtsvc convert .song.partial.wav song.wav` used to delete its input and write 44 bytes."""
    source = write_wav(tmp_path / ".song.partial.wav", harmonic_tone(1.0))
    before = source.read_bytes()
    code, _, err = run_cli(["convert", source, tmp_path / "song.wav"], capsys, monkeypatch)
    assert code == 0, err
    assert source.read_bytes() == before
    assert sf.info(str(tmp_path / "song.wav")).frames == pytest.approx(44100, abs=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".song.partial.wav", "song.wav"]


def test_sigterm_during_convert_leaves_no_partial_file(tmp_path):
    long = write_wav(tmp_path / "long.wav", np.tile(harmonic_tone(2.0), 150))  # 5 minutes
    out = tmp_path / "out.wav"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "cli.py", "convert", str(long), str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not [p for p in tmp_path.iterdir() if "partial" in p.name] and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
        assert [p for p in tmp_path.iterdir() if "partial" in p.name], "no temporary output appeared"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.wav"]  # no output, no partial


# --- prepare's cache names -----------------------------------------------------------------------

def test_prepare_keeps_a_b_wav_and_a__b_wav_apart(tmp_path):
    speaker = tmp_path / "data" / "alice"
    (speaker / "a").mkdir(parents=True)
    low = np.concatenate([harmonic_tone(3.0, f0=120.0), np.zeros(22050, np.float32)])
    high = np.concatenate([harmonic_tone(3.0, f0=300.0), np.zeros(22050, np.float32)])
    write_wav(speaker / "a" / "b.wav", low)
    write_wav(speaker / "a__b.wav", high)
    result = prepare_dataset(tmp_path / "data", cheap_extract, SETTINGS)
    assert result.processed == 2 and result.speakers["alice"]["sources"] == 2
    cache = tmp_path / "data" / CACHE_DIR / "alice"
    records = sorted(p.name for p in cache.glob("*.json"))
    assert records == ["a%2Fb.wav.json", "a__b.wav.json"]
    clips = {json.loads((cache / r).read_text())["source"]: json.loads((cache / r).read_text())["clips"]
             for r in records}
    files = [c["file"] for cs in clips.values() for c in cs]
    assert len(files) == len(set(files)) == 2  # one clip each, under two names
    assert set(clips) == {"alice/a/b.wav", "alice/a__b.wav"}


# --- packaging -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_wheel_carries_the_web_page(tmp_path):
    """`rtsvc serve` from a wheel answered 404 for `/`: package-data named a folder the page had left.
    The wheel is built from a copy of the tracked files (the editable install hides this)."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    src = tmp_path / "src"
    for name in tracked.decode().split("\0"):
        if name and (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((ROOT / name).read_bytes())
    page = sorted(p.name for p in (ROOT / "rtsvc" / "serve" / "web").iterdir())
    assert {"index.html", "app.js", "worklet.js"} <= set(page)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True,
                           timeout=600)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("rtsvc-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for name in page:
            assert f"rtsvc/serve/web/{name}" in names, sorted(n for n in names if "web" in n)
        page_html = (ROOT / "rtsvc/serve/web/index.html").read_bytes()
        assert archive.read("rtsvc/serve/web/index.html") == page_html
    # the wheel owns only `rtsvc`: export/, training/ and cli.py install under its namespace, every module
    tops = {n.split("/")[0] for n in names if not n.startswith("rtsvc-0.1.0.dist-info/")}
    assert tops == {"rtsvc"}, tops
    where = {"export/": "rtsvc/export/", "training/": "rtsvc/training/", "cli.py": "rtsvc/commands/cli.py",
             "cli_options.py": "rtsvc/commands/cli_options.py"}
    ours = tuple(where) + ("rtsvc/",)
    modules = [n for n in tracked.decode().split("\0")
               if n.endswith(".py") and n.startswith(ours) and n != "rtsvc/commands/__init__.py"]
    installed = {m: next((m.replace(k, v, 1) for k, v in where.items() if m.startswith(k)), m)
                 for m in modules}
    assert not [m for m, at in installed.items() if at not in names]
    with zipfile.ZipFile(wheel) as archive:
        entry_points = archive.read("rtsvc-0.1.0.dist-info/entry_points.txt").decode()
    assert "rtsvc = rtsvc.commands.cli:main" in entry_points
