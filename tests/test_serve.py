"""``reaudio serve``: request checks, the bounded queue, the database's clips only, and (slow) the page in a real
headless Chromium."""
import inspect
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import REPO, SHARED_DATA
from reaudio_core.serve import App, BadRequest, make_server, parse_generate

DEFAULTS = {"k": 3, "steps": 20, "guidance": 5.0, "seed": 0, "duration": 5.12, "retrieval": True}
LIMITS = {"k": 10, "steps": 200, "guidance": 50.0, "duration": 10.24, "prompt_chars": 2000}


def test_a_good_request_takes_the_defaults_and_the_given_numbers():
    req = parse_generate({"prompt": " a dog barks ", "steps": "30", "guidance": 2.5, "retrieval": False}, DEFAULTS, LIMITS)
    assert req == {"prompt": "a dog barks", "k": 3, "steps": 30, "guidance": 2.5, "seed": 0, "retrieval": False}
    req = parse_generate({"prompt": "x", "upload": "0123456789ab", "mode": "mask", "mask": "0.5-1, 2-3.25",
                          "retrieve_from": "both"}, DEFAULTS, LIMITS)
    assert req["mask"] == [(0.5, 1.0), (2.0, 3.25)] and req["retrieve_from"] == "both" and "strength" not in req
    assert parse_generate({"prompt": "x", "upload": "0123456789ab"}, DEFAULTS, LIMITS)["strength"] == 0.5


@pytest.mark.parametrize("params, message", [
    ({"prompt": "   "}, "empty prompt"),
    ({}, "empty prompt"),
    ({"prompt": "x" * 2001}, "at most 2000"),
    ({"prompt": "x", "steps": 10**9}, "steps must be a whole number from 1 to 200 (the server's --max-steps)"),
    ({"prompt": "x", "steps": 2.5}, "steps must be a whole number"),
    ({"prompt": "x", "k": 0}, "k must be a whole number from 1 to 10"),
    ({"prompt": "x", "guidance": "nan"}, "guidance must be a number from 0 to 50"),
    ({"prompt": "x", "seed": -1}, "seed must be a whole number"),
    ({"prompt": "x", "seed": True}, "seed must be a whole number"),
    ({"prompt": "x", "upload": "../../etc/passwd"}, "upload must be the id"),
    ({"prompt": "x", "upload": "0123456789ab", "strength": 1.5}, "strength must be a number from 0 to 1"),
    ({"prompt": "x", "upload": "0123456789ab", "mode": "mask", "mask": "3-2"}, "mask must be START-END"),
    ({"prompt": "x", "upload": "0123456789ab", "mode": "mask", "mask": "1-99"}, "END <= 10.24"),
    ({"prompt": "x", "upload": "0123456789ab", "mode": "remix"}, "mode must be strength or mask"),
    ({"prompt": "x", "upload": "0123456789ab", "retrieve_from": "db"}, "retrieve_from must be text, audio or both"),
])
def test_bad_requests_are_refused_with_a_message(params, message):
    with pytest.raises(BadRequest, match=None) as info:
        parse_generate(params, DEFAULTS, LIMITS)
    assert message in str(info.value) and info.value.status == 400


class Blocking:
    """A pipeline stand-in whose call waits until released (the queue test) or fails once (the error test)."""

    def __init__(self, pipe, fail=False):
        self.pipe, self.cfg, self.database = pipe, pipe.cfg, pipe.database
        self.entered, self.release, self.fail = threading.Event(), threading.Event(), fail

    def __call__(self, prompts, **kw):
        self.entered.set()
        self.release.wait(60)
        if self.fail:
            self.fail = False
            raise RuntimeError("a crash in the model")
        return self.pipe(prompts, **kw)


def test_one_generation_at_a_time_and_a_full_queue_is_busy(tiny_pipeline, tmp_path):
    stub = Blocking(tiny_pipeline)
    app = App(stub, out=tmp_path, max_queue=0)
    first = threading.Thread(target=app.generate, args=({"prompt": "a dog barks"},))
    first.start()
    assert stub.entered.wait(30)
    with pytest.raises(BadRequest, match="busy") as info:
        app.generate({"prompt": "rain"})
    assert info.value.status == 503
    stub.release.set()
    first.join(60)
    assert app.generate({"prompt": "rain"})["neighbours"][0]["caption"] == "rain falling on a roof"


@pytest.fixture
def server(tiny_pipeline, tmp_path):
    """The tiny pipeline behind a real HTTP server on a free port; yields (base url, app)."""
    app = App(tiny_pipeline, out=tmp_path / "out", max_upload_mb=0.5)
    httpd = make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", app
    httpd.shutdown()
    httpd.server_close()


def fetch(url, data=None, headers=None):
    """(status, body bytes, content type) of a GET, or a POST of ``data`` (bytes, or an object sent as JSON)."""
    if data is not None and not isinstance(data, bytes):
        data, headers = json.dumps(data).encode(), {"Content-Type": "application/json"}
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read(), r.headers.get("Content-Type")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("Content-Type")


def test_the_server_answers_errors_and_keeps_serving(server, tmp_path):
    url, app = server
    status, body, ctype = fetch(url + "/")
    assert status == 200 and b'id="generate"' in body and ctype.startswith("text/html")
    crash = Blocking(app.pipe, fail=True)
    crash.release.set()
    app.pipe = crash
    status, body, _ = fetch(url + "/api/generate", {"prompt": "a dog barks"})  # the stand-in crashes once
    assert status == 500 and "a crash in the model" in json.loads(body)["error"]
    status, body, _ = fetch(url + "/api/generate", {"prompt": ""})
    assert status == 400 and "empty prompt" in json.loads(body)["error"]
    status, body, _ = fetch(url + "/api/generate", b"{not json")
    assert status == 400 and "not JSON" in json.loads(body)["error"]
    status, body, _ = fetch(url + "/api/generate", {"prompt": "a dog barks", "k": 2, "seed": 4})
    out = json.loads(body)
    assert status == 200 and [n["caption"] for n in out["neighbours"]][0] == "a dog barking"
    status, wav, ctype = fetch(url + out["wav"])
    assert status == 200 and wav[:4] == b"RIFF" and wav[8:12] == b"WAVE" and ctype == "audio/wav"
    assert sf.read(io.BytesIO(wav))[0].shape == (int(1.28 * 16000),)
    status, png, _ = fetch(url + out["png"])
    assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n"
    status, clip, ctype = fetch(url + out["neighbours"][0]["clip"])
    assert status == 200 and clip == (app.db.root.parent / "c0.wav").read_bytes() and ctype == "audio/wav"
    off = json.loads(fetch(url + "/api/generate", {"prompt": "a dog barks", "retrieval": False})[1])
    assert off["neighbours"] == [] and app.pipe.cfg["generation"]["retrieval"] == "audio+text"  # restored


def test_only_the_databases_clips_are_served(server):
    url, _ = server
    for bad in ("/clip/3", "/clip/-1", "/clip/..%2F..%2Fetc%2Fpasswd", "/clip/../../etc/passwd", "/result/x.wav",
                "/result/../../etc/passwd", "/nothing"):
        assert fetch(url + bad)[0] == 404, bad
    status, body, _ = fetch(url + "/api/library?q=BELLS")
    assert status == 200 and [it["caption"] for it in json.loads(body)["items"]] == ["church bells ringing"]
    assert json.loads(fetch(url + "/api/library")[1])["total"] == 3


def test_uploads_are_checked(server, tmp_path):
    url, app = server
    status, body, _ = fetch(url + "/api/upload", b"this is not audio", {"X-Filename": "notes.txt"})
    assert status == 400 and "notes.txt is not usable audio" in json.loads(body)["error"]
    status, body, _ = fetch(url + "/api/upload", bytes(1 << 20))
    assert status == 413 and "at most 0.5 MB" in json.loads(body)["error"]
    buf = io.BytesIO()
    sf.write(buf, np.zeros((8000, 2), np.float32) + 0.1, 8000, format="WAV")
    status, body, _ = fetch(url + "/api/upload", buf.getvalue(), {"X-Filename": "two%20channels.wav"})
    up = json.loads(body)
    assert status == 200 and up["duration"] == 1.0 and up["name"] == "two channels.wav"
    status, body, _ = fetch(url + "/api/generate", {"prompt": "a dog barks", "upload": up["upload"], "strength": 0.3})
    if "audio" in inspect.signature(app.pipe.__call__).parameters:  # audio-to-audio is in this pipeline
        assert status == 200, body
    else:
        assert status == 400 and "takes no input clip yet" in json.loads(body)["error"]
    assert fetch(url + "/api/generate", {"prompt": "x", "upload": "0123456789ab"})[0] == 400


# -- the page in a real browser --------------------------------------------------------------------
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def browser():
    """A headless Chromium from the Debian packages driven by Selenium, or a skip naming what is missing."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        pytest.skip(f"no browser: {', '.join(missing)} missing (apt-get install chromium chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("no browser driver: selenium is not installed (pip install selenium)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="reaudio-chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1200,900", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options), profile


def start_server(*args):
    """``reaudio serve --port 0 ARGS`` in a process; returns (process, base url) once it listens."""
    env = {**os.environ, "REAUDIO_DATA": str(SHARED_DATA), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "reaudio_core.cli", "serve", "--port", "0", *args], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # "reaudio serve: http://127.0.0.1:PORT/ (...)" once the models are loaded
        lines.append(line)
        if line.startswith("reaudio serve: http://"):
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep draining
            return proc, line.split()[2].rstrip("/")
    proc.wait()
    raise AssertionError("reaudio serve did not start:\n" + "".join(lines[-20:]))


@pytest.mark.slow
def test_the_page_in_a_headless_chromium(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    driver, profile = browser()
    proc = None
    try:
        proc, url = start_server("--preset", "offline", "--steps", "10", "--threads", "2")
        driver.get(url + "/")
        wait = WebDriverWait(driver, 300)
        wait.until(lambda d: d.find_element(By.ID, "k").get_attribute("value") == "3")  # /api/info answered

        def generate(prompt):
            box = driver.find_element(By.ID, "prompt")
            box.clear()
            box.send_keys(prompt)
            before = driver.find_element(By.ID, "result-audio").get_attribute("src")
            driver.find_element(By.ID, "generate").click()
            wait.until(lambda d: d.find_element(By.ID, "message").text
                       or d.find_element(By.ID, "result-audio").get_attribute("src") not in ("", before))
            return driver.find_element(By.ID, "result-audio").get_attribute("src")

        src = generate("a dog barks")
        assert driver.find_element(By.ID, "message").text == ""
        status, wav, ctype = fetch(src)
        assert status == 200 and wav[:4] == b"RIFF" and wav[8:12] == b"WAVE" and ctype == "audio/wav"
        assert sf.info(io.BytesIO(wav)).samplerate == 16000 and sf.info(io.BytesIO(wav)).duration == pytest.approx(5.12)
        wait.until(lambda d: d.execute_script("return document.getElementById('result-audio').readyState") >= 1)
        items = driver.find_elements(By.CSS_SELECTOR, "#neighbours li.item")
        captions = [i.find_element(By.CLASS_NAME, "caption").text for i in items]
        assert len(items) == 3 and all("dog" in c for c in captions), captions
        if SHARED_DATA.is_dir():  # the neighbours' clips play from the database's files
            clip = items[0].find_element(By.TAG_NAME, "audio").get_attribute("src")
            assert fetch(clip)[0] == 200
        assert driver.find_element(By.ID, "spectrogram").get_attribute("src").endswith(".png")
        shot = os.environ.get("REAUDIO_SERVE_SCREENSHOT")
        if shot:  # the README's picture: REAUDIO_SERVE_SCREENSHOT=docs/serve.png pytest -m slow -k chromium
            from PIL import Image
            page = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
            page = page.resize((page.width * 3 // 4, page.height * 3 // 4), Image.LANCZOS).quantize(colors=96)
            page.save(shot, optimize=True)  # small: three quarters of the size, 96 colours
        # a bad request shows its message, and the next good one still works
        generate("   ")
        assert "empty prompt" in driver.find_element(By.ID, "message").text
        again = generate("church bells")
        assert again != src and driver.find_element(By.ID, "message").text == ""
        assert fetch(again)[1][:4] == b"RIFF"
        driver.find_element(By.ID, "library-q").send_keys("rooster")
        wait.until(lambda d: "8 items" in d.find_element(By.ID, "library-count").text)
        assert proc.poll() is None
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
        if proc is not None:
            proc.terminate()
            proc.wait(30)


@pytest.mark.parametrize("flags, message", [(["--port", "70000"], "--port must be from 0 to 65535"),
                                            (["--max-queue", "-1"], "--max-queue must be at least 0"),
                                            (["--max-steps", "0"], "--max-steps must be at least 1")])
def test_bad_serve_flags_are_one_line_before_loading(flags, message, capsys):
    from reaudio_core import cli
    assert cli.main(["serve", *flags]) == 2
    assert message in capsys.readouterr().err


def test_without_chromium_the_browser_test_skips_naming_it(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", "/nonexistent/chromium")
    with pytest.raises(pytest.skip.Exception, match="no browser: /nonexistent/chromium missing"):
        browser()
