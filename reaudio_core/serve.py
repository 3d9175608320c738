"""``reaudio serve``: a local web page that loads the models once and keeps them warm.

A standard-library HTTP server (``http.server.ThreadingHTTPServer``; no web framework to install) with one page
(``serve_page.html``) and a small JSON API under it:

* ``GET /api/info``: the model's defaults and the server's limits;
* ``POST /api/upload`` (the raw file as the body): an input clip, checked to be audio and at most
  ``--max-upload-mb``; answers its id and duration;
* ``POST /api/generate`` (JSON: prompt, k, steps, guidance, seed, retrieval, and with an uploaded clip either
  strength or mask, and retrieve_from): the neighbours used, the WAV and its spectrogram PNG;
* ``GET /api/library?q=TEXT``: database items whose caption or label contains TEXT;
* ``GET /clip/ID``: the audio file of database item ID (only files the database lists: a request names an
  item, never a path); ``GET /result/NAME``: a generated WAV or PNG.

One generation runs at a time; up to ``--max-queue`` more wait, and a request beyond that is answered 503 with
a "busy" message. A bad request (an empty prompt, a huge or non-audio upload, out-of-range numbers) is
answered 400/413 with one line the page shows; the server keeps serving. It binds 127.0.0.1 unless ``--host``
says otherwise. Details and the measured latency: docs/serve.md.
"""
from __future__ import annotations

import json
import logging
import math
import re
import shutil
import tempfile
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from .registry import ReaudioError

log = logging.getLogger("reaudio")

PAGE = Path(__file__).with_name("serve_page.html")
CLIP_TYPES = {".wav": "audio/wav", ".flac": "audio/flac", ".ogg": "audio/ogg", ".mp3": "audio/mpeg"}
_ID = re.compile(r"^[0-9a-f]{12}$")
LIBRARY_PAGE = 50


class BadRequest(Exception):
    """A request the server refuses, with the HTTP status and the one line the page shows."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


def add_serve_args(p) -> None:
    """``reaudio serve``'s own flags (the model flags come from :func:`reaudio_core.generate.add_model_args`)."""
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 picks a free one)")
    p.add_argument("--data", metavar="DIR", help="folder the database's relative clip paths are under "
                                                  "(default: $REAUDIO_DATA)")
    p.add_argument("--out", metavar="DIR", help="keep generated files here (default: a temporary folder)")
    p.add_argument("--max-queue", type=int, default=4, metavar="N", help="requests waiting beyond the one running")
    p.add_argument("--max-steps", type=int, default=200, metavar="N", help="largest steps a request may ask")
    p.add_argument("--max-upload-mb", type=float, default=20.0, metavar="MB", help="largest input clip")


# -- request checks ---------------------------------------------------------------------------
def _number(params: dict, key: str, default, lo, hi, integer: bool, what: str = ""):
    """``params[key]`` (a JSON number or its text) checked to lie in ``lo..hi``; ``default`` when absent."""
    value = params.get(key)
    if value is None or value == "":
        return default
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d{1,30}\s*", value):
        number = int(value)
    elif isinstance(value, (float, str)) and not integer:
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None or not math.isfinite(number) or not lo <= number <= hi:
        kind = "a whole number" if integer else "a number"
        raise BadRequest(f"{key} must be {kind} from {lo:g} to {hi:g}{what}, got {str(value)[:40]!r}")
    return number


def parse_mask(text: str, limit: float) -> list[tuple[float, float]]:
    """``"START-END[,START-END...]"`` in seconds -> ``[(start, end), ...]``, each within ``0..limit``."""
    spans = []
    for part in str(text).split(","):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*-\s*(\d+(?:\.\d+)?)\s*", part)
        if not m or not float(m[1]) < float(m[2]) <= limit:
            raise BadRequest(f"mask must be START-END[,START-END...] in seconds with START < END <= {limit:g}, "
                             f"got {str(text)[:60]!r}")
        spans.append((float(m[1]), float(m[2])))
    return spans


def parse_generate(params, defaults: dict, limits: dict) -> dict:
    """A checked generation request: ``prompt`` plus the keyword arguments for the pipeline and the
    server's own (``retrieval``, ``upload``). Raises :class:`BadRequest` with the page's message."""
    if not isinstance(params, dict):
        raise BadRequest("the request must be a JSON object")
    prompt = params.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadRequest("empty prompt: describe the sound to generate")
    if len(prompt) > limits["prompt_chars"]:
        raise BadRequest(f"the prompt has {len(prompt)} characters; at most {limits['prompt_chars']}")
    req = {"prompt": prompt.strip(),
           "k": _number(params, "k", defaults["k"], 1, limits["k"], True),
           "steps": _number(params, "steps", defaults["steps"], 1, limits["steps"], True, " (the server's --max-steps)"),
           "guidance": _number(params, "guidance", defaults["guidance"], 0, limits["guidance"], False),
           "seed": _number(params, "seed", defaults["seed"], 0, 2**63 - 1, True),
           "retrieval": bool(params.get("retrieval", True)) and defaults["retrieval"]}
    upload = params.get("upload") or None
    if upload is not None:
        if not isinstance(upload, str) or not _ID.match(upload):
            raise BadRequest("upload must be the id /api/upload answered")
        req["upload"] = upload
        mode = params.get("mode") or "strength"
        if mode == "strength":
            req["strength"] = _number(params, "strength", 0.5, 0, 1, False)
        elif mode == "mask":
            req["mask"] = parse_mask(params.get("mask") or "", limits["duration"])
        else:
            raise BadRequest(f"mode must be strength or mask, got {str(mode)[:20]!r}")
        source = params.get("retrieve_from") or "text"
        if source not in ("text", "audio", "both"):
            raise BadRequest(f"retrieve_from must be text, audio or both, got {str(source)[:20]!r}")
        req["retrieve_from"] = source
    return req


# -- the application --------------------------------------------------------------------------
class App:
    """The loaded pipeline, the queue, uploads and results; the HTTP handler calls its methods."""

    def __init__(self, pipe, out: str | Path | None = None, data: str | Path | None = None, max_queue: int = 4,
                 max_steps: int = 200, max_upload_mb: float = 20.0, keep: int = 50):
        import os
        self.pipe, self.db = pipe, pipe.database
        self.own_out = out is None
        self.out = Path(out) if out else Path(tempfile.mkdtemp(prefix="reaudio-serve-"))
        (self.out / "uploads").mkdir(parents=True, exist_ok=True)
        data = data or os.environ.get("REAUDIO_DATA")
        self.data = Path(data).expanduser() if data else None
        self.lock = threading.Lock()  # one generation at a time
        self.slots = threading.BoundedSemaphore(max(0, max_queue) + 1)  # the running one and those waiting
        self.max_upload = int(max_upload_mb * 2**20)
        self.keep = keep
        self.results: OrderedDict[str, list[Path]] = OrderedDict()
        self.uploads: OrderedDict[str, Path] = OrderedDict()
        self._uploads_lock = threading.Lock()
        self._clips: dict[int, Path | None] = {}
        gen = pipe.cfg["generation"]
        self.defaults = {"k": gen["k"], "steps": gen["steps"], "guidance": gen["guidance"], "seed": gen["seed"],
                         "duration": gen["duration"], "retrieval": gen["retrieval"] != "none"}
        from .pipeline import MAX_PROMPT_CHARS
        self.limits = {"k": max(1, min(64, len(self.db) if self.db is not None else 64)), "steps": min(max_steps, pipe.cfg["diffusion"]["num_train_timesteps"]),
                       "guidance": 50.0, "duration": float(gen["max_duration"]), "prompt_chars": MAX_PROMPT_CHARS,
                       "upload_bytes": self.max_upload}

    def close(self) -> None:
        if self.own_out:
            shutil.rmtree(self.out, ignore_errors=True)

    def info(self) -> dict:
        import inspect
        takes = set(inspect.signature(self.pipe.__call__).parameters)
        return {"defaults": self.defaults, "limits": self.limits, "database": len(self.db) if self.db else 0,
                "preset": self.pipe.cfg.get("preset"), "input_clip": {"audio", "strength", "mask"} <= takes}

    # -- database clips and the library --------------------------------------------------------
    def clip_path(self, item_id: int) -> Path | None:
        """The audio file of database item ``item_id``: its absolute path, else its relative path under the
        database's folder, the folder above it or ``--data``; None when none exists."""
        if item_id not in self._clips:
            found = None
            if self.db is not None and 0 <= item_id < len(self.db):
                raw = Path(str(self.db.items[item_id].get("path") or ""))
                roots = [self.db.root, self.db.root.parent] + ([self.data] if self.data else [])
                for p in [raw] if raw.is_absolute() else [r / raw for r in roots]:
                    if p.suffix.lower() in CLIP_TYPES and p.is_file():
                        found = p
                        break
            self._clips[item_id] = found
        return self._clips[item_id]

    def item(self, item_id: int, score: float | None = None) -> dict:
        it = self.db.items[item_id]
        out = {"id": item_id, "caption": it.get("caption"), "label": it.get("label"),
               "clip": f"/clip/{item_id}" if self.clip_path(item_id) else None}
        return out if score is None else {**out, "score": round(float(score), 4)}

    def library(self, query: str, offset: int = 0) -> dict:
        if self.db is None:
            return {"total": 0, "items": [], "offset": 0}
        q = query.strip().lower()
        hits = [i for i, it in enumerate(self.db.items)
                if not q or q in str(it.get("caption") or "").lower() or q in str(it.get("label") or "").lower()]
        return {"total": len(hits), "offset": offset,
                "items": [self.item(i) for i in hits[offset:offset + LIBRARY_PAGE]]}

    # -- uploads ------------------------------------------------------------------------------
    def upload(self, body: bytes, filename: str = "") -> dict:
        import soundfile as sf

        from .audio import AudioProblem, load_audio
        if not body:
            raise BadRequest("the upload is empty: choose an audio file")
        uid = uuid.uuid4().hex[:12]
        path = self.out / "uploads" / f"{uid}{Path(filename).suffix.lower()[:8] if filename else ''}"
        path.write_bytes(body)
        try:
            load_audio(path, min_duration=0.1)
            duration = sf.info(str(path)).duration
        except AudioProblem as exc:
            path.unlink(missing_ok=True)
            raise BadRequest(f"{filename or 'the upload'} is not usable audio: {exc}") from None
        with self._uploads_lock:
            self.uploads[uid] = path
            while len(self.uploads) > self.keep:  # older uploads' files go
                self.uploads.popitem(last=False)[1].unlink(missing_ok=True)
        return {"upload": uid, "duration": round(duration, 3), "name": filename}

    # -- generation ------------------------------------------------------------------------------
    def generate(self, params) -> dict:
        req = parse_generate(params, self.defaults, self.limits)
        if not self.slots.acquire(blocking=False):
            raise BadRequest("busy: the queue is full; try again in a moment", HTTPStatus.SERVICE_UNAVAILABLE)
        try:
            with self.lock:
                return self._generate(req)
        finally:
            self.slots.release()

    def _generate(self, req: dict) -> dict:
        from .plots import save_mel_png
        from .audio import save_wav
        kwargs = {"seed": req["seed"], "steps": req["steps"], "guidance": req["guidance"], "k": req["k"]}
        if "upload" in req:
            if not self.info()["input_clip"]:
                raise BadRequest("this reaudio's pipeline takes no input clip yet (ReAudioPipeline.__call__ has no "
                                 "audio= / strength= / mask=): generate from the prompt alone")
            path = self.uploads.get(req["upload"])
            if path is None:
                raise BadRequest("that upload is gone (the server restarted?): choose the file again")
            kwargs["audio"] = str(path)
            kwargs.update({k: req[k] for k in ("strength", "mask", "retrieve_from") if k in req})
        gen = self.pipe.cfg["generation"]
        retrieval = gen["retrieval"]
        t0 = time.perf_counter()
        try:
            if not req["retrieval"]:
                gen["retrieval"] = "none"
            result = self.pipe(req["prompt"], progress=False, **kwargs)
        except ReaudioError as exc:
            raise BadRequest(str(exc)) from None
        except TypeError as exc:
            if "unexpected keyword" not in str(exc):
                raise
            raise BadRequest(f"this reaudio's pipeline does not take that input ({exc})") from None
        finally:
            gen["retrieval"] = retrieval
        seconds = time.perf_counter() - t0
        rid = uuid.uuid4().hex[:12]
        wav, png = self.out / f"{rid}.wav", self.out / f"{rid}.png"
        neighbours = result.neighbours[0]
        save_wav(wav, result.waveforms[0], result.sample_rate)
        save_mel_png(png, result.mels[0], result.prompts[0], [n["caption"] for n in neighbours])
        self.results[rid] = [wav, png]
        while len(self.results) > self.keep:  # older results' files go
            for p in self.results.popitem(last=False)[1]:
                p.unlink(missing_ok=True)
        return {"id": rid, "prompt": result.prompts[0], "wav": f"/result/{rid}.wav", "png": f"/result/{rid}.png",
                "seconds": round(seconds, 3), "seed": req["seed"], "notes": list(result.warnings),
                "neighbours": [self.item(n["id"], n["score"]) for n in neighbours if "id" in n]}

    def result_path(self, name: str) -> Path | None:
        m = re.fullmatch(r"([0-9a-f]{12})\.(wav|png)", name)
        if not m or m[1] not in self.results:
            return None
        return self.out / name


# -- HTTP ---------------------------------------------------------------------------------------
class Handler(BaseHTTPRequestHandler):
    app: App  #: set on the class :func:`make_server` builds
    server_version = "reaudio"

    def log_message(self, fmt, *args):  # the request log is debug output, not the user's
        log.debug("serve: " + fmt, *args)

    def _send(self, status: int, body: bytes, ctype: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj, ensure_ascii=False).encode("utf-8"), "application/json; charset=utf-8")

    def _file(self, path: Path | None, ctype: str, download: str | None = None) -> None:
        if path is None or not path.is_file():
            return self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})
        extra = {"Content-Disposition": f'attachment; filename="{download}"'} if download else None
        self._send(HTTPStatus.OK, path.read_bytes(), ctype, extra)

    def _body(self, limit: int) -> bytes:
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise BadRequest("bad Content-Length") from None
        if n > limit:
            self.close_connection = True
            left = min(n, 4 * limit)  # read what was sent (to a bound), so the browser gets the answer
            while left > 0:
                chunk = self.rfile.read(min(left, 2**20))
                if not chunk:
                    break
                left -= len(chunk)
            raise BadRequest(f"the upload is {n / 2**20:.1f} MB; at most {limit / 2**20:g} MB",
                             HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        return self.rfile.read(n) if n else b""

    def _route(self, method: str) -> None:
        url = urlsplit(self.path)
        path, query = url.path, parse_qs(url.query)
        app = self.app
        if method == "GET" and path in ("/", "/index.html"):
            return self._send(HTTPStatus.OK, PAGE.read_bytes(), "text/html; charset=utf-8")
        if method == "GET" and path == "/api/info":
            return self._json(HTTPStatus.OK, app.info())
        if method == "GET" and path == "/api/library":
            offset = _number({"offset": (query.get("offset") or [""])[0]}, "offset", 0, 0, 10**9, True)
            return self._json(HTTPStatus.OK, app.library((query.get("q") or [""])[0], offset))
        if method == "GET" and path.startswith("/clip/"):
            item = path[len("/clip/"):]
            clip = app.clip_path(int(item)) if item.isdigit() and len(item) < 10 else None
            return self._file(clip, CLIP_TYPES.get(clip.suffix.lower(), "") if clip else "")
        if method == "GET" and path.startswith("/result/"):
            name = path[len("/result/"):]
            ctype = "audio/wav" if name.endswith(".wav") else "image/png"
            return self._file(app.result_path(name), ctype, download=name if name.endswith(".wav") else None)
        if method == "POST" and path == "/api/upload":
            name = Path(unquote(self.headers.get("X-Filename") or "")).name[:200]
            return self._json(HTTPStatus.OK, app.upload(self._body(app.max_upload), name))
        if method == "POST" and path == "/api/generate":
            try:
                params = json.loads(self._body(2**20).decode("utf-8") or "null")
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise BadRequest("the request is not JSON") from None
            return self._json(HTTPStatus.OK, app.generate(params))
        self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {method} {path[:80]}"})

    def _handle(self, method: str) -> None:
        try:
            self._route(method)
        except BadRequest as exc:
            self._json(exc.status, {"error": str(exc)})
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:  # one failed request must not stop the server
            log.error("serve: %s %s failed:\n%s", method, self.path, traceback.format_exc())
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {type(exc).__name__}: {exc}"})

    def do_GET(self):
        self._handle("GET")

    def do_HEAD(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")


def make_server(app: App, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """An HTTP server for ``app`` bound to ``host:port`` (0: a free port; ``server.server_address`` says which)."""
    handler = type("AppHandler", (Handler,), {"app": app})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def serve(args) -> int:
    """``reaudio serve``: load the pipeline, bind, print the address, serve until Ctrl-C."""
    from .generate import flag_overrides, load_pipeline
    if not 0 <= args.port <= 65535:
        raise ReaudioError(f"--port must be from 0 to 65535, got {args.port}")
    for flag, least in (("max_queue", 0), ("max_steps", 1), ("max_upload_mb", 0.001)):
        if not getattr(args, flag) >= least:
            raise ReaudioError(f"--{flag.replace('_', '-')} must be at least {least}, got {getattr(args, flag)}")
    if args.out:
        from .io import check_writable
        check_writable(args.out, "--out", folder=True)
    t0 = time.perf_counter()
    pipe = load_pipeline(args, list(args.overrides) + flag_overrides(args))
    app = App(pipe, out=args.out, data=args.data, max_queue=args.max_queue, max_steps=args.max_steps,
              max_upload_mb=args.max_upload_mb)
    try:
        server = make_server(app, args.host, args.port)
    except OSError as exc:
        app.close()
        raise ReaudioError(f"cannot serve on {args.host}:{args.port}: {exc.strerror or exc}") from None
    host, port = server.server_address[:2]
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("reaudio serve: bound to %s: anyone who can reach this machine can use the page", args.host)
    print(f"reaudio serve: http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}/ (models loaded in "
          f"{time.perf_counter() - t0:.1f} s; Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        app.close()
    return 0
