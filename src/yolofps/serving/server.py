"""`yolofps serve`: a lean HTTP server over the one inference runtime, with request batching.

    POST /predict   one encoded image as the raw body (Content-Type image/* or application/octet-stream)
                    -> {"detections": [COLUMNS records, original pixels], "width", "height", "batch",
                        "timing_ms": {"decode", "queue", "pre", "model", "post"}}
    GET  /health    model, variant, runtime, dtype, image size, batching settings and counts, uptime

Concurrent requests are gathered into one batch (up to `max_batch`, the batch size the bench measured fastest;
waiting at most `max_wait_ms`, and only while more requests are on their way) and run through the detector's
`Pipeline.timed` in one model thread: the event loop parses HTTP and never runs the model. Each body is checked
(size, then the header's pixel count, which PIL reads without decoding) and decoded in a small thread pool before
it joins a batch, so a bad image is answered 4xx on its own and never fails the good images batched with it.
There is no authentication: it binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import asyncio
import io
import json
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from yolofps.errors import DataSetError
from yolofps.runtime.host import decode_rgb
from yolofps.serving.detector import Detector, ServingConfig

ACCEPTED_TYPES = ("image/", "application/octet-stream")  # a missing Content-Type is sniffed like octet-stream
FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF")  # decoded by OpenCV; PIL reads their headers without decoding
DRAIN_BYTES = 64 * 2**20  # how much of a refused body is read and dropped so the client hears the 413


@dataclass(frozen=True)
class ServeOptions:
    """How the server batches and what it accepts (every limit answered 4xx/503, never by falling over)."""

    max_batch: int = 1
    max_wait_ms: float = 2.0
    max_bytes: int = 16 * 2**20
    max_pixels: int = 40_000_000
    max_pending: int = 256  # requests in flight beyond this get 503 at once, before their body is read
    decode_threads: int = 2


class RequestError(Exception):
    """A request the server refuses: an HTTP status and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def check_content_type(header: str | None) -> None:
    """415 unless the body is declared an image or raw bytes (curl's default form encoding is the usual slip)."""
    kind = (header or "application/octet-stream").split(";")[0].strip().lower()
    if not kind.startswith(ACCEPTED_TYPES):
        raise RequestError(415, f"Content-Type {kind!r} is not accepted: POST the image file's bytes as image/jpeg, "
                           "image/png, ... or application/octet-stream (curl: -H 'Content-Type: image/jpeg' "
                           "--data-binary @file.jpg)")


async def read_body(request: Any, max_bytes: int) -> bytes:
    """The request body, refused with 413 once it (or its declared length) passes `max_bytes`.

    Nothing past the limit is kept. The rest of a body up to DRAIN_BYTES is read and dropped before answering:
    a server that closes while the client is still sending makes the client's socket reset, and the client sees
    a broken pipe instead of the 413 (every HTTP server lingers like this; nginx calls it lingering_close).
    """
    declared = request.headers.get("content-length")
    declared = int(declared) if declared and declared.isdigit() else None
    chunks, size, stream = [], 0, request.stream()  # one generator: the drain below goes on where this stops
    if declared is None or declared <= max_bytes:
        async for chunk in stream:
            size += len(chunk)
            if size > max_bytes:
                break
            chunks.append(chunk)
    if size > max_bytes or (declared or 0) > max_bytes:
        if (declared or 0) <= DRAIN_BYTES:
            async for chunk in stream:
                size += len(chunk)
                if size > DRAIN_BYTES:
                    break
        length = f"body of {declared} bytes" if declared else "body"
        raise RequestError(413, f"{length} is over the limit of {max_bytes} bytes")
    if not size:
        raise RequestError(400, "empty body: POST one encoded image (JPEG, PNG, ...)")
    return b"".join(chunks)


def decode(body: bytes, max_pixels: int) -> np.ndarray:
    """uint8 RGB HWC of one image body; 400 for what is no image (or a truncated one), 413 for too many pixels."""
    try:
        with Image.open(io.BytesIO(body)) as header:  # reads the header only: the size costs no decoding
            kind, (width, height) = header.format, header.size
    except Image.DecompressionBombError:
        raise RequestError(413, f"image over PIL's decompression-bomb limit (this server's: {max_pixels} "
                           "pixels)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise RequestError(400, f"body is not an image file ({err.__class__.__name__})") from None
    if kind not in FORMATS:
        raise RequestError(415, f"image format {kind} is not served; send one of {', '.join(FORMATS)}")
    if width * height > max_pixels:
        raise RequestError(413, f"image of {width}x{height} = {width * height} pixels is over the limit of "
                           f"{max_pixels} pixels")
    try:
        return decode_rgb(body, f"{kind} body")
    except DataSetError as err:  # the header parsed, the data did not: a truncated or damaged file
        raise RequestError(400, f"{err} (truncated or damaged?)") from None


@dataclass
class Job:
    """One image waiting for a batch, and where its answer goes."""

    image: np.ndarray
    future: asyncio.Future
    queued: float  # perf_counter when it joined the queue


class Batcher:
    """Gathers concurrent requests into batches and runs each batch in the one model thread."""

    def __init__(self, detector: Detector, max_batch: int, max_wait_ms: float) -> None:
        self.detector, self.max_batch, self.max_wait = detector, max_batch, max_wait_ms / 1000
        self.queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=4 * max_batch)  # a full queue holds decoders back
        self.incoming = 0  # requests accepted and still being read or decoded: worth waiting for
        self.batch_sizes: Counter[int] = Counter()
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.task: asyncio.Task | None = None  # `run`, started with the app

    async def detect(self, image: np.ndarray) -> tuple[np.ndarray, dict[str, float], int]:
        """One image's detections [k, 6], its batch's timing (ms, plus this image's queue wait) and batch size."""
        job = Job(image, asyncio.get_running_loop().create_future(), time.perf_counter())
        await self.queue.put(job)
        return await job.future

    async def run(self) -> None:
        """Forever: gather a batch, run it in the model thread, hand each image its answer."""
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            if not batch:
                continue
            started = time.perf_counter()
            try:
                detections, (pre, model, post) = await loop.run_in_executor(
                    self.model_thread, self.detector.pipeline.timed, [job.image for job in batch])
            except Exception as err:  # a model fault, not the client's: every image of the batch gets a 500
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(RequestError(500, f"model failed: {err.__class__.__name__}: {err}"))
                continue
            self.batch_sizes[len(batch)] += 1
            for job, dets in zip(batch, detections, strict=True):
                if not job.future.done():  # a client that went away cancelled its future
                    timing = {"queue": (started - job.queued) * 1000, "pre": pre, "model": model, "post": post}
                    job.future.set_result((dets, timing, len(batch)))

    async def _gather(self) -> list[Job]:
        """The next batch: what is queued now, then up to max_wait for more while requests are still arriving."""
        batch = [await self.queue.get()]
        deadline = time.perf_counter() + self.max_wait
        while len(batch) < self.max_batch:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            remaining = deadline - time.perf_counter()
            if remaining <= 0 or self.incoming == 0:  # nobody else on the way: waiting would only add latency
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return [job for job in batch if not job.future.cancelled()]


def warm_up(detector: Detector, max_batch: int) -> None:
    """Run every batch size once: ONNX Runtime and OpenVINO compile one model per batch size on first use."""
    size = detector.config.imgsz
    image = np.zeros((size, size, 3), np.uint8)
    for batch in range(1, max_batch + 1):
        detector.pipeline.detect([image] * batch)


def best_batch(throughput: dict[str, float] | None) -> int:
    """The batch size with the highest measured throughput (a bench row's `throughput`: batch -> images/s)."""
    if not throughput:
        return 1
    return int(max(throughput.items(), key=lambda item: item[1])[0])


def bench_row(bench_json: Path, config: ServingConfig) -> dict[str, Any] | None:
    """The metrics/bench.json row that runs like `config` (runtime, mode, dtype, image size, threads).

    Rows of several models can share an execution: the selected row wins, then the first measured one.
    """
    try:
        bench = json.loads(Path(bench_json).read_text())
    except (OSError, ValueError):
        return None
    how = (config.runtime, config.mode, config.dtype, config.imgsz, config.threads)
    rows = [row for row in bench.get("variants", []) if row.get("status") != "failed" and
            (row["runtime"], row["mode"], row["dtype"], row["imgsz"], row.get("threads", 0)) == how]
    selected = (bench.get("selected") or {}).get("name")
    return next((row for row in rows if row["name"] == selected), rows[0] if rows else None)


def JSONResponse(content: Any, status_code: int = 200, headers: dict[str, str] | None = None):  # noqa: N802
    """Starlette's JSONResponse, encoded by orjson: json.dumps took 0.7 ms for 150 detections, orjson 0.05 ms."""
    import orjson
    from starlette.responses import Response

    return Response(orjson.dumps(content), status_code, headers, media_type="application/json")


def create_app(detector: Detector, options: ServeOptions, about: dict[str, Any] | None = None):
    """The ASGI app over `detector`: /predict (batched) and /health. `about`: extra /health fields.

    Starlette, the core FastAPI is built on: two routes over a raw body need none of FastAPI's validation.
    """
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    batcher = Batcher(detector, options.max_batch, options.max_wait_ms)
    decoders = ThreadPoolExecutor(max_workers=options.decode_threads, thread_name_prefix="decode")
    counts: Counter[str] = Counter()  # HTTP status -> responses
    in_flight = [0]  # /predict requests being answered now
    started = time.time()

    @asynccontextmanager
    async def lifespan(app):
        batcher.task = asyncio.create_task(batcher.run())
        yield
        batcher.task.cancel()
        batcher.model_thread.shutdown(wait=False)
        decoders.shutdown(wait=False)

    async def http_error(request, err: HTTPException):  # the router's 404/405, as {"error": ...}
        counts[str(err.status_code)] += 1
        return JSONResponse({"error": f"{err.detail}: {request.method} {request.url.path} (POST /predict, GET "
                             "/health)"}, status_code=err.status_code, headers=err.headers)

    async def predict(request):
        in_flight[0] += 1
        try:
            if in_flight[0] > options.max_pending:
                raise RequestError(503, f"server busy: {options.max_pending} requests in flight; retry shortly")
            answer = JSONResponse(await _predict(request, batcher, decoders, options))
        except RequestError as err:
            answer = JSONResponse({"error": str(err)}, status_code=err.status)
        finally:
            in_flight[0] -= 1
        counts[str(answer.status_code)] += 1
        return answer

    async def health(request):
        report = health_report(detector, options, batcher, counts, started) | (about or {})
        return JSONResponse(report, 200 if report["status"] == "ok" else 503)

    routes = [Route("/predict", predict, methods=["POST"]), Route("/health", health, methods=["GET"])]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})


async def _predict(request: Any, batcher: Batcher, decoders: ThreadPoolExecutor, options: ServeOptions) -> dict:
    """One /predict request: checks, decode off the event loop, a place in a batch, the records."""
    check_content_type(request.headers.get("content-type"))
    batcher.incoming += 1
    try:
        body = await read_body(request, options.max_bytes)
        begin = time.perf_counter()
        image = await asyncio.get_running_loop().run_in_executor(decoders, decode, body, options.max_pixels)
        decoded = time.perf_counter()
    finally:
        batcher.incoming -= 1
    dets, timing, batch = await batcher.detect(image)
    timing = {"decode": (decoded - begin) * 1000} | timing
    return {"detections": batcher.detector.records([dets]), "width": image.shape[1], "height": image.shape[0],
            "batch": batch, "timing_ms": {k: round(v, 3) for k, v in timing.items()}}


def health_report(detector: Detector, options: ServeOptions, batcher: Batcher, counts: Counter,
                  started: float) -> dict[str, Any]:
    """What /health answers: the model as loaded, the batching settings, and what the server has done so far."""
    config = detector.config
    sizes = batcher.batch_sizes
    running = batcher.task is not None and not batcher.task.done()
    return {"status": "ok" if running else "batcher stopped", "runtime": config.runtime, "mode": config.mode,
            "dtype": config.dtype, "imgsz": config.imgsz, "threads": config.threads,
            "device": detector.pipeline.info.kind,
            "classes": len(config.names), "uptime_s": round(time.time() - started, 1),
            "requests": sum(counts.values()), "responses": dict(sorted(counts.items())),
            "served": sum(size * n for size, n in sizes.items()), "batches": sum(sizes.values()),
            "largest_batch": max(sizes, default=0), "batch_sizes": {str(k): v for k, v in sorted(sizes.items())},
            "options": asdict(options)}


def serve(detector: Detector, options: ServeOptions, *, host: str = "127.0.0.1", port: int = 8000,
          about: dict[str, Any] | None = None, ready: Callable[[str], None] | None = None) -> None:
    """Warm the detector up for every batch size, then serve it with uvicorn until interrupted."""
    import uvicorn

    # the pixel limit below is ours; PIL's bomb warning would print for every over-limit image we refuse anyway
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"yolofps serve: warning: binding {host}: there is no authentication, anyone who reaches this port "
              "can use the model", file=sys.stderr, flush=True)
    warm_up(detector, options.max_batch)
    app = create_app(detector, options, about)
    if ready:
        ready(f"http://{host}:{port}")
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
