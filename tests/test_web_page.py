"""The browser page: served and connectable; driven in headless Chromium with a fake microphone."""

import asyncio
import base64
import contextlib
import http.client
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from websockets.asyncio.client import connect

from rtsvc.serve.server import VoiceSource
from tests.test_server import TOKEN, IdentityVoice, http_get, run, running, settled, tone

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
    "--disable-sync", "--disable-background-networking", "--disable-component-update", "--disable-extensions",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
    "--autoplay-policy=no-user-gesture-required", "--remote-debugging-port=0",
]


def test_page_loads_and_connects_like_the_browser_does():
    async def main():
        async with running() as server:
            page = await asyncio.to_thread(http_get, server.port, "/?autostart=1&token=x")
            scripts = [await asyncio.to_thread(http_get, server.port, f"/{name}")
                       for name in ("app.js", "worklet.js")]
            # what app.js sends, from the page's own origin
            async with connect(f"ws://127.0.0.1:{server.port}/v1/stream",
                               origin=f"http://127.0.0.1:{server.port}") as ws:
                await ws.send(json.dumps({"type": "start", "sample_rate": 48000, "format": "f32le",
                                          "channels": 1, "pitch_shift": 3}))
                ready = json.loads(await ws.recv())
                await ws.send(json.dumps({"type": "set", "output_gain_db": -6}))  # what a slider sends
                settings = json.loads(await ws.recv())
            return page, scripts, ready, settings

    page, scripts, ready, settings = run(main())
    assert page[0] == 200 and b"<script src=\"app.js\">" in page[2]
    for control in (b'id="speaker"', b'id="controls"', b'id="mic"', b'id="output"', b'id="status"',
                    b'id="preset-save"', b'id="input-meter"'):
        assert control in page[2]
    assert all(status == 200 for status, _, _ in scripts)
    assert b'addModule("worklet.js")' in scripts[0][2] and b'"rtsvc-io"' in scripts[1][2]
    assert b'withToken("/v1/info")' in scripts[0][2]  # the knob controls come from the server
    assert ready["type"] == "ready" and ready["format"] == "f32le" and ready["settings"]["pitch_shift"] == 3
    assert settings == {"type": "settings", "settings": {**ready["settings"], "output_gain_db": -6.0}}


async def devtools_page(user_data: Path, timeout: float = 20.0) -> str:
    """The page target's debugger websocket URL (Chromium writes its port to DevToolsActivePort)."""
    for _ in range(int(timeout / 0.1)):
        port_file = user_data / "DevToolsActivePort"
        if port_file.exists() and port_file.read_text().strip():
            port = int(port_file.read_text().split()[0])

            def targets(port: int) -> list:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/json/list")
                return json.loads(conn.getresponse().read())

            pages = [t for t in await asyncio.to_thread(targets, port) if t["type"] == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
        await asyncio.sleep(0.1)
    raise AssertionError("Chromium did not open its devtools port")


class Page:
    """Minimal Chrome DevTools Protocol client: evaluate JavaScript in the page."""

    def __init__(self, ws):
        self.ws, self.next_id = ws, 0

    async def call(self, method: str, **params) -> dict:
        self.next_id += 1
        await self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            reply = json.loads(await self.ws.recv())
            if reply.get("id") == self.next_id:
                return reply.get("result", {})

    async def eval(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 40.0):
        for _ in range(int(timeout / 0.25)):
            value = await self.eval(expression)
            if value:
                return value
            await asyncio.sleep(0.25)
        state = await self.eval("JSON.stringify(window.rtsvc)")
        raise AssertionError(f"timed out waiting for {expression}; page state {state}")


@contextlib.asynccontextmanager
async def chromium_page(url: str, tmp_path: Path):
    """Headless Chromium on `url` with a 220 Hz tone as its fake microphone; the page's `Page`."""
    mic = tmp_path / "mic.wav"
    sf.write(mic, tone(48000, 2.0, f0=220.0), 48000, subtype="PCM_16")
    user_data = Path(tempfile.mkdtemp(prefix="rtsvc-chromium-", dir=tmp_path))
    flags = ["--window-size=900,1100", f"--user-data-dir={user_data}",
             f"--use-file-for-fake-audio-capture={mic}"]
    browser = subprocess.Popen([CHROMIUM, *CHROMIUM_FLAGS, *flags, url],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "HOME": str(tmp_path)})
    try:
        async with connect(await devtools_page(user_data), max_size=None) as cdp:
            yield Page(cdp)
    finally:
        browser.terminate()
        try:
            browser.wait(10)
        except subprocess.TimeoutExpired:
            browser.kill()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_page_streams_fake_microphone_through_the_server_in_headless_chromium(tmp_path):
    async def main():
        async with running(token=TOKEN) as server:
            url = f"http://127.0.0.1:{server.port}/?autostart=1&pitch=12&token={TOKEN}"
            async with chromium_page(url, tmp_path) as page:
                ready = await page.wait_for("window.rtsvc && rtsvc.ready && JSON.stringify(rtsvc.ready)")
                await page.wait_for("rtsvc.samplesReceived > 24000 && rtsvc.peakReceived > 0")
                await page.eval("const g = document.getElementById('output_gain_db'); g.value = '-12';"
                                "g.dispatchEvent(new Event('change'))")
                await page.wait_for("rtsvc.settings && rtsvc.settings.output_gain_db === -12")
                state = json.loads(await page.eval("JSON.stringify(window.rtsvc)"))
                live = dict(server.state.__dict__)
            await settled(server)
            return json.loads(ready), state, live, list(server.state.history)

    ready, state, live, history = run(main(), timeout=90)
    print(f"page state: {state}\nserver session: {history[-1]}")
    assert ready["format"] == "f32le" and ready["sample_rate"] in (44100, 48000)
    assert ready["settings"]["pitch_shift"] == 12.0  # from ?pitch=12
    assert state["error"] is None and state["framesSent"] > 10
    assert state["samplesReceived"] > 24000 and state["peakReceived"] > 0.02  # converted voice came back
    assert live["sessions_total"] == 1
    session = history[-1]
    assert session["format"] == "f32le" and session["samples_in"] >= state["samplesReceived"] * 0.5
    assert session["out_peak"] > 0.02 and session["error"] is None
    assert np.isfinite(state["queuedMs"])




PANEL_STATE = """JSON.stringify({
  speakers: [...document.getElementById('speaker').options].map(o => o.value),
  controls: [...document.querySelectorAll('#controls input, #controls select')].map(e => e.id),
  advanced: [...document.querySelectorAll('#advanced-controls input, #advanced-controls select')]
    .map(e => e.id),
  denoise: [...document.getElementById('denoise').options].map(o => o.value),
  mics: document.getElementById('mic').options.length,
  status: document.getElementById('status').textContent,
  pitch: document.getElementById('pitch_shift').value,
  denoiseValue: document.getElementById('denoise').value,
  presets: [...document.getElementById('preset-list').options].map(o => o.value),
  saved: JSON.parse(localStorage.getItem('rtsvc.settings') || 'null'),
})"""


def _set(control: str, value) -> str:
    return (f"(() => {{ const e = document.getElementById({control!r}); e.value = {json.dumps(str(value))};"
            " e.dispatchEvent(new Event('change')); return true; })()")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_control_panel_renders_keeps_settings_and_presets_in_headless_chromium(tmp_path):
    """Before Start: speakers, knob controls from /v1/info, latency, device pickers; settings survive a
    reload; presets save and load; a screenshot shows the panel drawn; Start streams with them."""
    from PIL import Image

    shot = tmp_path / "panel.png"

    async def main():
        async with running(token=TOKEN) as server:
            url = f"http://127.0.0.1:{server.port}/?token={TOKEN}"
            async with chromium_page(url, tmp_path) as page:
                await page.wait_for("window.rtsvc && rtsvc.panelReady")
                before = json.loads(await page.eval(PANEL_STATE))
                await page.eval(_set("pitch_shift", 7))
                await page.eval("document.getElementById('preset-name').value = 'robot';"
                                "document.getElementById('preset-save').click()")
                await page.eval(_set("pitch_shift", -3))
                await page.eval(_set("preset-list", "robot"))
                await page.eval("document.getElementById('preset-load').click()")
                await page.eval(_set("denoise", "rnnoise"))
                edited = json.loads(await page.eval(PANEL_STATE))
                await page.eval("location.reload()")
                await asyncio.sleep(0.5)
                await page.wait_for("window.rtsvc && rtsvc.panelReady")
                reloaded = json.loads(await page.eval(PANEL_STATE))
                png = await page.call("Page.captureScreenshot", format="png")
                shot.write_bytes(base64.b64decode(png["data"]))
                await page.eval("document.getElementById('start').click()")
                ready = await page.wait_for("rtsvc.ready && JSON.stringify(rtsvc.ready)")
                await page.wait_for("rtsvc.samplesReceived > 9600")
                state = json.loads(await page.eval("JSON.stringify(window.rtsvc)"))
            await settled(server)
            return before, edited, reloaded, json.loads(ready), state

    before, edited, reloaded, ready, state = run(main(), timeout=120)
    print(f"panel before Start: {before}\nafter a reload: {reloaded}\nscreenshot: {shot}")
    assert before["speakers"] == ["dsp"]
    assert before["controls"] == ["pitch_shift", "formant_shift", "gate_db", "vad", "input_gain_db",
                                  "output_gain_db", "denoise"]  # the DSP voice: basic knobs (KNOB_TABLE)
    assert before["denoise"] == ["off", "deepfilternet", "rnnoise"]
    assert "latency ≈ 39 ms in the engine" in before["status"] and before["mics"] >= 1
    assert edited["pitch"] == "7" and edited["presets"] == ["robot"]  # the preset brought 7 back
    assert "noise suppression" in edited["status"]  # its latency is shown before Start
    assert reloaded["pitch"] == "7" and reloaded["denoiseValue"] == "rnnoise"
    assert reloaded["presets"] == ["robot"]
    assert reloaded["saved"]["pitch_shift"] == 7 and reloaded["saved"]["denoise"] == "rnnoise"
    image = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert image.shape[0] >= 600 and image.shape[1] >= 600
    assert image.std() > 10 and len(np.unique(image.reshape(-1, 3), axis=0)) > 50  # drawn, not blank
    top = image[: image.shape[0] // 2]
    assert (top.mean(axis=2) > 150).mean() > 0.002  # light text on the dark panel
    assert ready["settings"]["pitch_shift"] == 7 and ready["settings"]["denoise"] == "rnnoise"
    assert ready["latency_ms"] > 48 + 30  # the denoiser's delay is in the reported latency
    assert state["error"] is None and state["samplesReceived"] > 9600


class BehindVoice(IdentityVoice):
    """Takes 1.5x a block's duration per block, sleeping: the server falls behind whatever the load."""

    def convert(self, audio, knobs, start_sample=0, tail=None):
        time.sleep(1.5 * (tail or len(audio)) / self.sample_rate)
        return super().convert(audio, knobs, start_sample, tail)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_page_shows_the_servers_overload_warning_in_headless_chromium(tmp_path):
    async def main():
        async with running(VoiceSource("behind", ["echo"], BehindVoice), token=TOKEN, workers=1,
                           max_lag_ms=200) as server:
            async with chromium_page(f"http://127.0.0.1:{server.port}/?autostart=1&token={TOKEN}",
                                     tmp_path) as page:
                await page.wait_for("rtsvc.warnings > 0")
                state = json.loads(await page.eval(
                    "JSON.stringify({warning: rtsvc.warning, banner: $('warning').textContent,"
                    " shown: !$('warning').hidden && $('warning').offsetHeight > 0})"))
            await settled(server)
            return state

    state = run(main(), timeout=90)
    assert state["warning"]["code"] == "overloaded" and state["warning"]["dropped_ms"] > 0
    assert "the server is behind" in state["banner"] and "200 ms late" in state["banner"]
    assert state["shown"] is True  # in its own banner, not lost in the status line


PANEL_LOOK = """JSON.stringify({
  badge: $('conn').textContent, hint: !$('hint').hidden && $('hint').offsetHeight > 0,
  warning: $('warning').hidden ? null : $('warning').textContent, latency: $('latency').textContent,
  basic: [...document.querySelectorAll('#controls input, #controls select')].map(e => e.id),
  advanced: [...document.querySelectorAll('#advanced-controls input, #advanced-controls select')]
    .map(e => e.id),
  advancedHelp: [...document.querySelectorAll('#advanced-controls .help')].map(e => e.textContent),
  advancedOpen: $('advanced').open, pitchMax: $('pitch_shift').max,
})"""


async def _screenshot(page, path: Path) -> None:
    png = await page.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
    path.write_bytes(base64.b64decode(png["data"]))


def _drawn(path: Path) -> np.ndarray:
    from PIL import Image

    image = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    assert image.std() > 10 and len(np.unique(image.reshape(-1, 3), axis=0)) > 50, path  # not blank
    return image


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_control_panel_stopped_running_and_warned_in_headless_chromium(tmp_path):
    """The streamer's panel: before Start a microphone hint, the basic knobs in view and the advanced
    ones folded with a line of help each (a V3 voice: its guidance knobs), the connection state in the
    badge; once live the hint goes and the end-to-end latency shows; a server `warning` is shown in
    its own banner. Screenshots of the three (RTSVC_SCREENSHOTS=DIR keeps them)."""
    shots = Path(os.environ.get("RTSVC_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    v3 = VoiceSource("my-v3-voice", ["alice", "bob"], IdentityVoice, family="v3")

    async def panel():
        async with running(v3, token=TOKEN) as server:
            async with chromium_page(f"http://127.0.0.1:{server.port}/?token={TOKEN}", tmp_path) as page:
                await page.wait_for("window.rtsvc && rtsvc.panelReady")
                stopped = json.loads(await page.eval(PANEL_LOOK))
                await page.eval("$('advanced').open = true")
                await _screenshot(page, shots / "panel-stopped.png")
                await page.eval("$('advanced').open = false; $('start').click()")
                await page.wait_for("rtsvc.ready && rtsvc.samplesReceived > 9600 && rtsvc.queuedMs > 0")
                await asyncio.sleep(0.5)
                live = json.loads(await page.eval(PANEL_LOOK))
                await _screenshot(page, shots / "panel-running.png")
            await settled(server)
        async with running(VoiceSource("behind", ["echo"], BehindVoice), token=TOKEN, workers=1,
                           max_lag_ms=200) as server:
            async with chromium_page(f"http://127.0.0.1:{server.port}/?autostart=1&token={TOKEN}",
                                     tmp_path) as page:
                await page.wait_for("rtsvc.warnings > 0")
                warned = json.loads(await page.eval(PANEL_LOOK))
                await _screenshot(page, shots / "panel-warning.png")
            await settled(server)
        return stopped, live, warned

    stopped, live, warned = run(panel(), timeout=150)
    print(f"stopped: {stopped}\nlive: {live}\nwarned: {warned}\nscreenshots in {shots}")
    assert stopped["badge"] == "stopped" and stopped["hint"] and stopped["warning"] is None
    assert stopped["basic"] == ["pitch_shift", "pitch_mode", "formant_shift", "gate_db", "vad",
                                "input_gain_db", "output_gain_db", "denoise"]  # models: auto pitch, formant
    assert stopped["advanced"] == ["ds_cfg_strength", "spk_cfg_strength", "skip_cfg_strength",
                                   "cfg_skip_layers", "cfg_rescale", "steps", "schedule", "vad_threshold"]
    assert not stopped["advancedOpen"]
    assert stopped["advancedHelp"][0].startswith("Content-degradation guidance strength")  # KNOB_TABLE help
    assert stopped["pitchMax"] == "36" and stopped["latency"].startswith("≈ ")  # the server's range
    assert live["badge"] == "live" and not live["hint"] and live["latency"].endswith(" ms")
    assert warned["badge"] == "live" and "the server is behind" in warned["warning"]
    for name in ("stopped", "running", "warning"):
        _drawn(shots / f"panel-{name}.png")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_page_hides_controls_the_voice_cannot_honour_in_headless_chromium(tmp_path):
    """A V3 bundle exported without a skip pass on a server without pyrnnoise (`supports`): no
    skip-layer sliders, no rnnoise choice, and a saved rnnoise setting is not sent."""
    from rtsvc.serve.capabilities import Capabilities

    capabilities = Capabilities("v3", (), {"rnnoise": "the rnnoise denoiser needs pyrnnoise"})
    source = VoiceSource("v3.rtsvc", ["echo"], IdentityVoice, family="v3", capabilities=capabilities)

    async def main():
        async with running(source, token=TOKEN) as server:
            url = f"http://127.0.0.1:{server.port}/?token={TOKEN}"
            async with chromium_page(url, tmp_path) as page:
                await page.wait_for("window.rtsvc && rtsvc.panelReady")
                panel = json.loads(await page.eval(PANEL_STATE))
                await page.eval("localStorage.setItem('rtsvc.settings', "
                                "JSON.stringify({denoise: 'rnnoise'}))")
                await page.eval("location.reload()")
                await asyncio.sleep(0.5)
                await page.wait_for("window.rtsvc && rtsvc.panelReady")
                await page.eval("document.getElementById('start').click()")
                ready = await page.wait_for("rtsvc.ready && JSON.stringify(rtsvc.ready)")
            await settled(server)
            return panel, json.loads(ready)

    panel, ready = run(main(), timeout=120)
    shown = panel["controls"] + panel["advanced"]
    assert "ds_cfg_strength" in shown and "pitch_shift" in shown
    assert "skip_cfg_strength" not in shown and "cfg_skip_layers" not in shown
    assert panel["denoise"] == ["off", "deepfilternet"]
    assert ready["settings"]["denoise"] == "off"


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_page_blends_two_speakers_in_headless_chromium(tmp_path):
    """The blend control (a second speaker and its weight) sends `alice:0.70,bob:0.30` as the speaker,
    keeps it across a reload, and is hidden for a voice with one speaker."""
    source = VoiceSource("two.ckpt", ["alice", "bob"], IdentityVoice, family="v2")
    pick = ("(() => { const w = document.getElementById('blend-with'); w.value = 'bob';"
            " w.dispatchEvent(new Event('change'));"
            " const b = document.getElementById('blend'); b.value = '0.3';"
            " b.dispatchEvent(new Event('change')); })()")
    hidden = "[...document.querySelectorAll('.row.blend')].every(r => r.hidden)"

    async def main():
        async with running(source, token=TOKEN) as server:
            url = f"http://127.0.0.1:{server.port}/?token={TOKEN}"
            async with chromium_page(url, tmp_path) as page:
                await page.wait_for("window.rtsvc && rtsvc.panelReady")
                shown = not await page.eval(hidden)
                await page.eval(pick)
                await page.eval("location.reload()")
                await asyncio.sleep(0.5)
                await page.wait_for("window.rtsvc && rtsvc.panelReady")
                kept = await page.eval("document.getElementById('blend').value")
                await page.eval("document.getElementById('start').click()")
                ready = await page.wait_for("rtsvc.ready && JSON.stringify(rtsvc.ready)")
            await settled(server)
        one_voice = VoiceSource("one.ckpt", ["alice"], IdentityVoice, family="v2")
        async with running(one_voice, token=TOKEN) as one:
            async with chromium_page(f"http://127.0.0.1:{one.port}/?token={TOKEN}", tmp_path) as page:
                await page.wait_for("window.rtsvc && rtsvc.panelReady")
                one_hidden = await page.eval(hidden)
            await settled(one)
        return shown, kept, json.loads(ready), one_hidden

    shown, kept, ready, one_hidden = run(main(), timeout=120)
    assert shown and kept == "0.3"
    assert ready["settings"]["speaker"] == "alice:0.70,bob:0.30"
    assert one_hidden
