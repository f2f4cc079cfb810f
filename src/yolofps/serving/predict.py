"""`yolofps predict`: a detector over an image, a folder, a glob, a video or a camera, timed as the bench times it.

Every image goes through `detector.pipeline.timed([image])`, the bench's own call: an image file is decoded inside
the pre-process phase, exactly as in the bench, so the pre / model / post figures printed at the end are the bench's
figures for that model on this machine. A video frame arrives decoded (OpenCV's VideoCapture): its decoding is
reported apart. Every source is one iterator of `Item`s, so the loop is written once. A file or frame that cannot be
read is a skipped item (listed in the summary and in the JSON's `skipped`), never the end of the run.

Outputs in the run folder (`runs/predict/<N>` by default, a new one each run): annotated images under their names
relative to the source, one annotated `.mp4` per video (mp4v), and `detections.csv` or `detections.json` (boxes in
original pixels, class names, the source file and frame).
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from yolofps.bench.measure import Timings
from yolofps.data import formats
from yolofps.errors import ConfigError, DataSetError, YolofpsError
from yolofps.fileio import write_json
from yolofps.serving.detector import COLUMNS, Detector, detection_rows

VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"})
FORMATS = ("csv", "json")
RUNS = Path("runs") / "predict"
OUTPUT_COLUMNS = [*COLUMNS, "source", "frame"]
WARMUP_RUNS = 2  # the first calls build what a backend builds lazily (OpenVINO's compiled model per batch size)


class InputSourceError(YolofpsError, ValueError):
    """A SOURCE that names nothing to read (no such file, an empty folder, a glob without matches, no camera)."""


@dataclass(frozen=True)
class Item:
    """One image of the run: where it came from, and the image (a file, or an RGB frame) or why it is unreadable."""

    index: int  # position in the run: the image_index of its detections
    source: str  # the file, or `camera0`
    output: str  # its annotated output, relative to the run folder
    frame: int | None = None  # frame number in a video or camera stream; None for an image file
    image: Path | np.ndarray | None = None
    error: str | None = None
    count: int = 1  # how many frames a skipped item stands for (the undecodable rest of a video)
    fps: float = 0.0  # frame rate of its video (for the annotated .mp4)
    decode_ms: float | None = None  # a video frame's decoding by VideoCapture (an image file decodes in `pre`)


@dataclass(frozen=True)
class Source:
    """What SOURCE named: its items (read lazily) and how many there will be (None when a video or camera streams)."""

    items: Iterator[Item]
    total: int | None


@dataclass(frozen=True)
class PredictJob:
    """What to run on and what to write: the source, the run folder, the detections format, annotated outputs."""

    source: str
    out: Path | None = None  # None: the next numbered folder under runs/predict
    fmt: str = "csv"
    save: bool = True
    progress: bool = True


@dataclass
class PredictResult:
    """What a run did: images detected, items skipped, the per-image phase times, wall time, files written."""

    out: Path
    images: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)
    timings: Timings = field(default_factory=Timings)
    decode_ms: list[float] = field(default_factory=list)  # video frames: VideoCapture's decoding, outside `pre`
    wall_s: float = 0.0
    files: list[Path] = field(default_factory=list)
    interrupted: bool = False

    def summary(self) -> dict[str, Any]:
        """Counts, mean and median ms per image of each phase, end-to-end FPS (decode, detect, draw, write)."""
        phases = {"pre": self.timings.pre, "model": self.timings.model, "post": self.timings.post}
        mean = {k: round(float(np.mean(v)), 3) if v else None for k, v in phases.items()}
        median = {k: round(float(np.median(v)), 3) if v else None for k, v in phases.items()}
        skipped = sum(s.get("count", 1) for s in self.skipped)
        return {"images": self.images, "skipped": skipped, "mean_ms": mean, "median_ms": median,
                "video_decode_ms": round(float(np.mean(self.decode_ms)), 3) if self.decode_ms else None,
                "fps_end_to_end": round(self.images / self.wall_s, 2) if self.wall_s > 0 else None,
                "wall_s": round(self.wall_s, 3), "interrupted": self.interrupted, "out": str(self.out)}

    def line(self) -> str:
        """The one summary line predict prints at the end (plus the skipped items, one per line)."""
        s = self.summary()
        if not self.images:
            text = "predict: no image could be read"
        else:
            mean, plural = s["mean_ms"], "s" if s["images"] != 1 else ""
            decode = f" (+{s['video_decode_ms']} ms video decoding)" if s["video_decode_ms"] is not None else ""
            text = (f"predict: {s['images']} image{plural}, {mean['pre']} ms pre, {mean['model']} ms model, "
                    f"{mean['post']} ms post per image (mean, batch 1){decode}, {s['fps_end_to_end']} FPS end to end")
        text += f", {s['skipped']} skipped{' (interrupted)' if self.interrupted else ''} -> {self.out}"
        return "\n".join([text, *(f"  skipped {_where(x)}: {x['reason']}" for x in self.skipped)])


def _where(skip: dict[str, Any]) -> str:
    return skip["source"] if skip.get("frame") is None else f"{skip['source']} frame {skip['frame']}"


def next_run_dir(base: Path = RUNS) -> Path:
    """A new numbered folder under `base` (1, 2, ...: one more than the highest), as ultralytics' runs/ folders."""
    base.mkdir(parents=True, exist_ok=True)
    number = max((int(p.name) for p in base.iterdir() if p.name.isdigit()), default=0) + 1
    while True:
        try:
            (base / str(number)).mkdir()
            return base / str(number)
        except FileExistsError:  # another run took it meanwhile
            number += 1


def with_nms(detector: Detector, conf: float | None = None, iou: float | None = None,
             max_det: int | None = None) -> Detector:
    """The detector with the given NMS settings in place of its deployment's (None keeps a setting)."""
    changes = {k: v for k, v in (("conf", conf), ("iou", iou), ("max_det", max_det)) if v is not None}
    for key in ("conf", "iou"):
        if key in changes and not 0 <= changes[key] <= 1:
            raise ConfigError(f"--{key} must be in [0, 1], got {changes[key]}")
    if "max_det" in changes and changes["max_det"] < 1:
        raise ConfigError(f"--max-det must be at least 1, got {changes['max_det']}")
    if changes:
        detector.config = dataclasses.replace(detector.config, **changes)
        detector.pipeline = detector.pipeline.with_deployment(
            dataclasses.replace(detector.pipeline.deployment, **changes))
    return detector


def open_source(source: str) -> Source:
    """The items of SOURCE: an image or video file, a folder (recursively, hidden files aside), a glob, a camera."""
    path = Path(source)
    if source.isdigit() and not path.exists():
        return Source(_camera(int(source)), None)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path)))
        if not files:
            raise InputSourceError(f"{source}: the folder holds no files")
        return _files(files, path)
    if path.is_file():
        return _files([path], path.parent)
    if glob.has_magic(source):
        files = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
        if not files:
            raise InputSourceError(f"{source}: no file matches this pattern")
        return _files(files, Path(_common_parent(files)))
    raise InputSourceError(f"{source}: no such file or folder; SOURCE is an image or video file, a folder, a glob "
                           "(quote it: 'images/*.jpg') or a camera index (0)")


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _common_parent(files: list[Path]) -> str:
    return os.path.commonpath([str(p.resolve().parent) for p in files])


def _files(files: list[Path], base: Path) -> Source:
    streams = any(p.suffix.lower() in VIDEO_SUFFIXES for p in files)
    return Source(_file_items(files, base), None if streams else len(files))


def _file_items(files: list[Path], base: Path) -> Iterator[Item]:
    """Images as paths (decoded inside the timed pre-process, as the bench does), videos frame by frame."""
    index = 0
    base = base.resolve()
    for path in files:
        relative = path.resolve().relative_to(base).as_posix()
        suffix = path.suffix.lower()
        if suffix in VIDEO_SUFFIXES:
            for item in _frames(cv2.VideoCapture(str(path)), str(path), str(Path(relative).with_suffix(".mp4")),
                                index):
                yield item
                index += 1
            continue
        error = None if suffix in formats.IMAGE_SUFFIXES else f"not an image or video file (suffix {suffix or 'none'})"
        yield Item(index, str(path), relative, image=path, error=error)
        index += 1


def _camera(number: int) -> Iterator[Item]:
    capture = cv2.VideoCapture(number)
    if not capture.isOpened():
        raise InputSourceError(f"camera {number}: OpenCV cannot open it (no such device, or it is busy)")
    return _frames(capture, f"camera{number}", f"camera{number}.mp4", 0)


def _frames(capture: cv2.VideoCapture, source: str, output: str, start: int) -> Iterator[Item]:
    """A video's frames as RGB items; frames the stream promised but did not deliver become one skipped item."""
    if not capture.isOpened():
        yield Item(start, source, output, error="not a video OpenCV can open")
        return
    total, fps = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), capture.get(cv2.CAP_PROP_FPS) or 30.0
    frame = 0
    try:
        while True:
            began = time.perf_counter()
            ok, bgr = capture.read()
            if not ok:
                break
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            yield Item(start + frame, source, output, frame, rgb, fps=fps,
                       decode_ms=(time.perf_counter() - began) * 1000)
            frame += 1
    finally:
        capture.release()
    # OpenCV ends a damaged stream at its first undecodable frame: the rest of what the file declares is skipped
    if frame < total:
        yield Item(start + frame, source, output, frame, error=f"frames {frame}..{total - 1} of the {total} the "
                   "file declares could not be decoded", count=total - frame)
    elif frame == 0:
        yield Item(start, source, output, error="no frame could be decoded")


def predict(detector: Detector, job: PredictJob, *, description: str = "", source: Source | None = None
            ) -> PredictResult:
    """Detect on every item of `job.source` (or of `source`, opened already), write into `job.out`, time it."""
    if job.fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {list(FORMATS)}, got {job.fmt!r}")
    source = source or open_source(job.source)  # a SOURCE that names nothing fails before anything is written
    job = dataclasses.replace(job, out=job.out or next_run_dir())
    job.out.mkdir(parents=True, exist_ok=True)
    warm_up(detector)
    result = PredictResult(job.out)
    outputs = Outputs(job, detector.config.names)
    started = time.perf_counter()
    try:
        with _progress(job, source.total) as bar:
            for item in source.items:
                detect_one(detector, item, outputs, result)
                bar.update(item.count)
                if result.images:
                    ms = float(np.mean(result.timings.total[-50:]))  # the last 50 images: the running rate
                    bar.set_postfix_str(f"{1000 / ms:.0f} FPS pre+model+post", refresh=False)
    except KeyboardInterrupt:  # a camera runs until Ctrl-C: keep what was detected so far
        result.interrupted = True
    finally:
        result.wall_s = time.perf_counter() - started
        result.files = outputs.close(result, description, job.source)
    return result


def warm_up(detector: Detector) -> None:
    """Untimed runs on a blank image: what the first call builds (compiled models, sessions) is not charged."""
    blank = np.zeros((detector.config.imgsz, detector.config.imgsz, 3), np.uint8)
    for _ in range(WARMUP_RUNS):
        detector.pipeline.timed([blank])


def detect_one(detector: Detector, item: Item, outputs: Outputs, result: PredictResult) -> None:
    """One item through the bench's timed pipeline call; an unreadable one is recorded as skipped."""
    error = item.error
    if error is None:
        try:
            (detections,), (pre, model, post) = detector.pipeline.timed([item.image])
        except (DataSetError, cv2.error) as err:  # decode_image names the file: keep only the reason
            error = str(err).strip().removeprefix(f"{item.source}: ")
    if error is not None:
        result.skipped.append({"source": item.source, "frame": item.frame, "reason": error, "count": item.count})
        return
    result.images += 1
    result.timings.pre.append(pre)
    result.timings.model.append(model)
    result.timings.post.append(post)
    if item.decode_ms is not None:
        result.decode_ms.append(item.decode_ms)
    outputs.add(item, detections)


def _progress(job: PredictJob, total: int | None):
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (a log file, a CI job)
    return tqdm(total=total, unit="img", desc="predict", disable=None if job.progress else True, dynamic_ncols=True)


class Outputs:
    """What a run writes: annotated images and videos (unless job.save is off) and the detections file."""

    def __init__(self, job: PredictJob, names: list[str]) -> None:
        self.job, self.names = job, list(names)
        self.rows: list[dict[str, Any]] = []  # JSON: written at the end
        self.detections = job.out / f"detections.{job.fmt}"
        self.files: list[Path] = []
        self.video: tuple[str, cv2.VideoWriter] | None = None  # the annotated video being written
        self.handle = self.writer = None
        if job.fmt == "csv":  # streamed: a long video's detections do not wait in memory
            self.handle = self.detections.open("w", newline="")
            self.writer = csv.DictWriter(self.handle, fieldnames=OUTPUT_COLUMNS)
            self.writer.writeheader()

    def add(self, item: Item, detections: np.ndarray) -> None:
        """Record an item's detections (and its annotated image or video frame)."""
        rows = [row | {"image_index": item.index, "source": item.source, "frame": item.frame}
                for row in detection_rows([detections], self.names)]
        if self.writer is not None:
            self.writer.writerows(rows)
        else:
            self.rows += rows
        if self.job.save:
            self.annotate(item, detections)

    def annotate(self, item: Item, detections: np.ndarray) -> None:
        """Draw the boxes on the image (decoded again: the timed decode stays the bench's) and write it."""
        if isinstance(item.image, np.ndarray):
            bgr = cv2.cvtColor(item.image, cv2.COLOR_RGB2BGR)
        else:
            bgr = formats.decode_image(item.image)
        draw(bgr, detections, self.names)
        if item.frame is None:
            path = self.job.out / item.output
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imencode(path.suffix, bgr)[1].tofile(path)  # tofile: no path through OpenCV's own file handling
            self.files.append(path)
            return
        if self.video is None or self.video[0] != item.output:
            self._close_video()
            path = self.job.out / item.output
            path.parent.mkdir(parents=True, exist_ok=True)
            size = (bgr.shape[1], bgr.shape[0])
            self.video = item.output, cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), item.fps, size)
            self.files.append(path)
        self.video[1].write(bgr)

    def _close_video(self) -> None:
        if self.video is not None:
            self.video[1].release()
            self.video = None

    def close(self, result: PredictResult, description: str, source: str) -> list[Path]:
        """Finish every file; the JSON format gets the detections, the skipped items and the summary."""
        self._close_video()
        if self.handle is not None:
            self.handle.close()
        else:
            write_json(self.detections, {"model": description, "source": source, "columns": OUTPUT_COLUMNS,
                                         "detections": self.rows, "skipped": result.skipped,
                                         "summary": result.summary()})
        return [*self.files, self.detections]


def draw(bgr: np.ndarray, detections: np.ndarray, names: list[str]) -> None:
    """Boxes and `name score` labels on a BGR image, in place, one colour per class."""
    thickness = max(1, round(sum(bgr.shape[:2]) / 600))
    for x1, y1, x2, y2, score, cls in detections.tolist():
        colour = PALETTE[int(cls) % len(PALETTE)]
        top_left, bottom_right = (int(x1), int(y1)), (int(x2), int(y2))
        cv2.rectangle(bgr, top_left, bottom_right, colour, thickness, cv2.LINE_AA)
        label = f"{names[int(cls)] if int(cls) < len(names) else int(cls)} {score:.2f}"
        (width, height), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
        y = max(int(y1), height + 2)
        cv2.rectangle(bgr, (int(x1), y - height - 2), (int(x1) + width, y), colour, -1)
        cv2.putText(bgr, label, (int(x1), y - 2), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)


# ultralytics' colour order (BGR), so the pictures look like the ones users know
PALETTE = [(56, 56, 255), (151, 157, 255), (31, 112, 255), (29, 178, 255), (49, 210, 207), (10, 249, 72),
           (23, 204, 146), (134, 219, 61), (52, 147, 26), (187, 212, 0), (168, 153, 44), (255, 194, 0),
           (147, 69, 52), (255, 115, 100), (236, 24, 0), (255, 56, 132), (133, 0, 82), (255, 56, 203),
           (200, 149, 255), (199, 55, 255)]
