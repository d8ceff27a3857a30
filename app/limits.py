"""What a public app must refuse or bound: upload size (files and base64 data URLs), image size read from the
header before anything is decoded, pixels being decoded at once, prompt length, and which routes exist.

Every limit is documented in docs/app.md; the messages say the limit and what to do instead.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import threading
from contextlib import contextmanager
from pathlib import Path

import gradio as gr

from glip.errors import ImageError, PromptError
from glip.image import MAX_PIXELS, probe_size
from glip.prompts import parse_prompt

MAX_UPLOAD_BYTES = 20 * 2**20            # per file, uploads and data URLs alike
MAX_PROMPT_CHARS = 2000
MAX_PHRASES = 100
# At most this many pixels (as the image headers state them) are being decoded / held at a time: one image
# at the pixel limit and a few ordinary ones, or many small ones. A request over the budget waits.
PIXEL_BUDGET = 3 * MAX_PIXELS // 2
BUDGET_WAIT_S = 120.0
TRIM_PIXELS = 16_000_000                 # after an image this large, freed memory goes back to the OS
PUBLIC_API = ("ground_json",)            # the only endpoint callable without the page
# JSON bodies: a prompt and file references, or one data URL of at most MAX_UPLOAD_BYTES (base64: 4/3)
MAX_JSON_BODY = MAX_UPLOAD_BYTES * 4 // 3 + 64 * 1024
DRAIN_LIMIT = 4 * MAX_JSON_BODY          # an over-cap body up to this size is read (and dropped) before the 413


# --- images ------------------------------------------------------------------------------------------------
def decode_data_url(url: str, folder: Path) -> str:
    """A base64 data URL → a file in `folder`, refused (before decoding) when over the upload limit."""
    head, _, data = url.partition(",")
    if not head.startswith("data:") or ";base64" not in head:
        raise ImageError("Only base64 data URLs (data:image/...;base64,...) are accepted.")
    if len(data) > MAX_UPLOAD_BYTES * 4 // 3 + 4:
        raise ImageError(f"The image is larger than the {MAX_UPLOAD_BYTES // 2**20} MB upload limit.")
    try:
        raw = base64.b64decode(data, validate=False)
    except (binascii.Error, ValueError):
        raise ImageError("The data URL is not valid base64.") from None
    if len(raw) > MAX_UPLOAD_BYTES:
        raise ImageError(f"The image is larger than the {MAX_UPLOAD_BYTES // 2**20} MB upload limit.")
    probe_size(raw)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha1(raw).hexdigest()[:16]}.img"
    path.write_bytes(raw)
    return str(path)


def guard_image(component: gr.Image, scratch_dir) -> gr.Image:
    """Replace the image component's preprocessing: check the upload cap and the header size, and hand the
    callback a file path without decoding anything (gradio's own preprocessing converts the whole image to
    RGB first). Refusals are gr.Error with the message, never a traceback."""

    def preprocess(payload):
        if payload is None:
            return None
        try:
            url = getattr(payload, "url", None)
            if url and url.startswith("data:"):
                return decode_data_url(url, Path(scratch_dir()))
            path = getattr(payload, "path", None)
            if not path:
                raise ImageError("No image received.")
            size = Path(path).stat().st_size
            if size > MAX_UPLOAD_BYTES:
                raise ImageError(f"The image is larger than the {MAX_UPLOAD_BYTES // 2**20} MB upload limit.")
            probe_size(path)
            return str(path)
        except ImageError as e:
            raise gr.Error(str(e), print_exception=False) from None
        except OSError as e:
            raise gr.Error(f"Could not read the image ({e.__class__.__name__}).", print_exception=False) from None

    component.preprocess = preprocess
    return component


def guard_value(component, what: str):
    """An out-of-range value (e.g. over the API) fails with `what` as a clear message, never a traceback."""
    original = component.preprocess

    def preprocess(payload):
        try:
            return original(payload)
        except Exception as e:  # noqa: BLE001 - includes gradio's own range errors
            detail = e.message if isinstance(e, gr.Error) else e.__class__.__name__
            raise gr.Error(f"{what} ({detail})", print_exception=False) from None

    component.preprocess = preprocess
    return component


class PixelBudget:
    """Bounds the pixels being decoded or held by requests at the same time (header sizes)."""

    def __init__(self, total: int = PIXEL_BUDGET, wait_s: float = BUDGET_WAIT_S):
        self.total, self.wait_s = total, wait_s
        self.used = 0
        self.peak = 0
        self.cond = threading.Condition()

    @contextmanager
    def hold(self, pixels: int):
        pixels = min(int(pixels), self.total)
        with self.cond:
            if not self.cond.wait_for(lambda: self.used + pixels <= self.total, timeout=self.wait_s):
                raise gr.Error("The server is busy with other large images; try again in a minute.",
                               print_exception=False)
            self.used += pixels
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            if pixels >= TRIM_PIXELS:
                _trim()
            with self.cond:
                self.used -= pixels
                self.cond.notify_all()


def _trim() -> None:
    """Hand freed heap memory back to the OS (glibc): a large decode's buffers otherwise stay resident in the
    thread's malloc arena, and the next large image, decoded in another thread, stacks on top of them."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


# --- prompts -------------------------------------------------------------------------------------------------
def check_prompt(prompt: str, phrases=None, mode: str = "auto"):
    """The parsed prompt, or PromptError when it is over the app's limits (the library itself has none)."""
    if len(prompt) > MAX_PROMPT_CHARS:
        raise PromptError(f"The prompt has {len(prompt):,} characters; this app takes at most {MAX_PROMPT_CHARS:,} "
                          f"(and {MAX_PHRASES} phrases) per request. Split it into several requests, or run the "
                          "library locally (`GLIP.predict` has no limit).")
    parsed = parse_prompt(prompt, phrases=phrases, mode=mode)
    if len(parsed.phrases) > MAX_PHRASES:
        raise PromptError(f"The prompt has {len(parsed.phrases)} phrases; this app grounds at most {MAX_PHRASES} per "
                          "request. Split it into several requests, or run the library locally (no limit).")
    return parsed


# --- routes --------------------------------------------------------------------------------------------------
_DIRECT = re.compile(r"^(?:/gradio_api)?/(?:run|api)(?:/|$)")
_CALL = re.compile(r"^(?:/gradio_api)?/call/(?:v2/)?([^/]+)/?$")


class RequestGuard:
    """ASGI middleware: no direct (queue-skipping) REST route at all; `/call/<name>` only for PUBLIC_API;
    JSON request bodies capped at MAX_JSON_BODY (a data URL of one upload-sized image)."""

    def __init__(self, app, public=PUBLIC_API, max_body: int = MAX_JSON_BODY):
        self.app, self.public, self.max_body = app, set(public), max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        if _DIRECT.match(path):
            return await _refuse(send, 404, "Direct calls are off: every request goes through the queue "
                                            "(POST /gradio_api/call/ground_json, or gradio_client).")
        m = _CALL.match(path)
        if m and m.group(1) not in self.public:
            return await _refuse(send, 404, f"No public endpoint /{m.group(1)}; the API is {sorted(self.public)}.")
        headers = dict(scope.get("headers") or [])
        ctype = headers.get(b"content-type", b"").decode("latin-1")
        if "multipart/form-data" in ctype:  # uploads: gradio enforces max_file_size while streaming
            return await self.app(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            if int(length) <= DRAIN_LIMIT:  # read and drop the body, so that the client gets the answer
                while (await receive()).get("more_body"):
                    pass
            return await _refuse(send, 413, f"Request body over {self.max_body // 2**20} MB: upload images with "
                                            f"POST /gradio_api/upload (limit {MAX_UPLOAD_BYTES // 2**20} MB).")
        seen = 0

        async def capped():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_body:  # a chunked body over the cap: the app sees the client go away
                    return {"type": "http.disconnect"}
            return msg

        return await self.app(scope, capped, send)


async def _refuse(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
