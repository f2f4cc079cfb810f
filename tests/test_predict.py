"""`yolofps predict` on the session's tiny pipeline: every kind of model and source, the outputs, the failures.

Through the real CLI (`yolofps.cli.main` in process, and once the console script), real models (torch, ONNX
Runtime, OpenVINO, the registered MLflow pyfunc), real files and a real mp4 written with OpenCV.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from helpers import PROJECT_ROOT, copy_run, free_port, run_cmd
from yolofps import cli
from yolofps.data import formats
from yolofps.paths import Paths
from yolofps.serving.detector import COLUMNS, Detector, ServingConfig

NAME = "yolofps-detector"
BOX = ["x1", "y1", "x2", "y2", "score", "class_id"]


def val_folder(root: Path) -> Path:
    return Paths(root).augmented_data / "images" / "val"


def bench_json(root: Path) -> dict:
    return json.loads(Paths(root).metrics("bench").read_text())


def class_names(root: Path) -> list[str]:
    return json.loads((root / "models" / "train" / "best" / "meta.json").read_text())["names"]


def predict(root: Path, source, out: Path, *options: str) -> int:
    """`yolofps predict SOURCE --params <root>/params.yaml --out OUT OPTIONS...` in this process."""
    return cli.main(["predict", str(source), "--params", str(root / "params.yaml"), "--out", str(out), *options])


def row_detector(root: Path, name: str, conf: float | None = None) -> Detector:
    """A bench row's Detector built by hand from its row (not through serving.sources), for the expected boxes."""
    bench = bench_json(root)
    row = next(v for v in bench["variants"] if v["name"] == name)
    deployment = bench["environment"]["deployment"]
    config = ServingConfig(row["runtime"], row["mode"], row["dtype"], row["imgsz"], class_names(root),
                           deployment["conf"] if conf is None else conf, deployment["iou"], deployment["max_det"],
                           row["device"], row.get("threads", 0))
    return Detector(root / row["artifact"], config)


def one_by_one(detector: Detector, images: list) -> list[dict]:
    """Detector.rows image by image (batch 1, as predict runs): a batch of 4 may reorder the tiny model's ties."""
    return [row | {"image_index": index} for index, image in enumerate(images) for row in detector.rows([image])]


def boxes(rows: list[dict]) -> np.ndarray:
    return np.array([[row["image_index"], *(float(row[k]) for k in BOX)] for row in rows], dtype=float)


def assert_same_detections(got: list[dict], expected: list[dict]) -> None:
    assert len(expected) > 0 and len(got) == len(expected), (len(got), len(expected))
    np.testing.assert_allclose(boxes(got), boxes(expected), atol=1e-3)
    assert [r["class_name"] for r in got] == [r["class_name"] for r in expected]


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def frame_count(path: Path) -> int:
    capture, count = cv2.VideoCapture(str(path)), 0
    assert capture.isOpened(), path
    while capture.read()[0]:
        count += 1
    capture.release()
    return count


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_a_folder_with_a_bench_variant_gives_the_rows_of_its_detector_and_annotated_images(shared_run, tmp_path,
                                                                                          capsys):
    root = shared_run.root
    selected = bench_json(root)["selected"]["name"]
    assert predict(root, val_folder(root), tmp_path / "out", "--model", "selected", "--format", "json") == 0
    printed = capsys.readouterr().out
    assert f"predict: {selected} from " in printed and "as the bench ran it" in printed
    images = formats.list_images(val_folder(root))
    assert f"predict: {len(images)} images, " in printed and ", 0 skipped -> " in printed
    result = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert result["columns"] == [*COLUMNS, "source", "frame"] and result["skipped"] == []
    assert result["summary"]["images"] == len(images) and result["summary"]["mean_ms"]["model"] > 0
    assert_same_detections(result["detections"], one_by_one(row_detector(root, selected), images))
    assert {r["source"] for r in result["detections"]} <= {str(p) for p in images}
    for image in images:  # one annotated picture per image, its size, boxes drawn on it
        annotated = cv2.imread(str(tmp_path / "out" / image.name))
        original = cv2.imread(str(image))
        assert annotated.shape == original.shape and np.abs(annotated.astype(int) - original).max() > 100


def test_a_checkpoint_folder_runs_in_torch_eager_and_the_csv_holds_its_rows(shared_run, tmp_path, capsys):
    root = shared_run.root
    folder = root / "models" / "train" / "best"
    assert predict(root, val_folder(root), tmp_path / "out", "--model", str(folder), "--conf", "0.0",
                   "--max-det", "20", "--no-save") == 0
    printed = capsys.readouterr().out
    assert "torch eager fp32" in printed and "image size and class names from" in printed
    images = formats.list_images(val_folder(root))
    imgsz = json.loads((folder / "meta.json").read_text())["imgsz"]
    expected = one_by_one(Detector(folder, ServingConfig("torch", "eager", "fp32", imgsz, class_names(root),
                                                         conf=0.0, max_det=20)), images)
    rows = read_csv(tmp_path / "out" / "detections.csv")
    assert_same_detections(rows, expected)
    assert all(row["frame"] == "" for row in rows)
    per_image = np.bincount([int(r["image_index"]) for r in rows])
    assert per_image.max() == 20  # --max-det replaced the deployment's 300
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["detections.csv"]  # --no-save


@pytest.mark.parametrize("model", ["models/bench/train.onnx", "models/bench/train-openvino"])
def test_exported_models_read_their_size_from_the_input_and_names_from_the_project(shared_run, tmp_path, capsys,
                                                                                   model):
    root = shared_run.root
    assert predict(root, val_folder(root), tmp_path / "out", "--model", str(root / model), "--no-save") == 0
    printed = capsys.readouterr().out
    imgsz = bench_json(root)["environment"]["imgsz"]
    assert f"{imgsz} px from the model's input shape" in printed and "fp32: the default" in printed
    assert "class names from " + str(root / "models" / "train" / "best" / "meta.json") in printed


def test_a_glob_selects_its_matches_only(shared_run, tmp_path, capsys):
    root = shared_run.root
    images = formats.list_images(val_folder(root))[:2]
    pattern = str(val_folder(root) / "val_0000[01].jpg")
    assert predict(root, pattern, tmp_path / "out", "--model", "selected") == 0
    assert "predict: 2 images" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(["detections.csv", *(p.name for p in images)])
    assert {r["source"] for r in read_csv(tmp_path / "out" / "detections.csv")} == {str(p) for p in images}


def write_video(path: Path, images: list[Path], frames: int, size: int = 96) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (size, size))
    for index in range(frames):
        writer.write(cv2.resize(cv2.imread(str(images[index % len(images)])), (size, size)))
    writer.release()


def test_a_video_is_annotated_frame_by_frame_into_an_mp4(shared_run, tmp_path, capsys):
    root = shared_run.root
    video = tmp_path / "clip.mp4"
    write_video(video, formats.list_images(val_folder(root)), frames=9)
    frames_in = frame_count(video)
    assert predict(root, video, tmp_path / "out", "--model", "selected", "--format", "json") == 0
    assert "video decoding" in capsys.readouterr().out
    result = json.loads((tmp_path / "out" / "detections.json").read_text())
    summary = result["summary"]
    assert frames_in == 9 and summary["images"] + summary["skipped"] == frames_in
    assert frame_count(tmp_path / "out" / "clip.mp4") == summary["images"]
    assert {r["frame"] for r in result["detections"]} == set(range(summary["images"]))
    assert all(r["source"] == str(video) for r in result["detections"])
    detector = row_detector(root, bench_json(root)["selected"]["name"])
    capture = cv2.VideoCapture(str(video))
    first = cv2.cvtColor(capture.read()[1], cv2.COLOR_BGR2RGB)  # the same decoded frame, detected directly
    capture.release()
    assert_same_detections([r for r in result["detections"] if r["frame"] == 0], detector.rows([first]))


def test_unreadable_files_are_reported_and_skipped_and_the_others_processed(shared_run, tmp_path, capsys):
    root = shared_run.root
    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    good = formats.list_images(val_folder(root))[:2]
    (folder / good[0].name).write_bytes(good[0].read_bytes())
    (folder / "sub" / good[1].name).write_bytes(good[1].read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("not an image")
    video = tmp_path / "clip.mp4"
    write_video(video, good, frames=4)
    (folder / "cut.mp4").write_bytes(video.read_bytes()[: video.stat().st_size // 3])  # no index: unopenable
    assert predict(root, folder, tmp_path / "out", "--model", "selected", "--format", "json") == 0
    printed = capsys.readouterr().out
    assert "predict: 2 images" in printed and ", 3 skipped -> " in printed
    result = json.loads((tmp_path / "out" / "detections.json").read_text())
    skipped = {Path(s["source"]).name: s["reason"] for s in result["skipped"]}
    assert set(skipped) == {"broken.jpg", "notes.txt", "cut.mp4"}
    assert "not an image OpenCV can decode" in skipped["broken.jpg"] and "suffix .txt" in skipped["notes.txt"]
    for name, reason in skipped.items():
        assert f"skipped {folder / name}: {reason}" in printed
    assert {Path(r["source"]).name for r in result["detections"]} == {p.name for p in good}
    assert (tmp_path / "out" / good[0].name).is_file() and (tmp_path / "out" / "sub" / good[1].name).is_file()


@pytest.fixture(scope="module")
def registered(shared_run, tmp_path_factory):
    """A copy of the tiny pipeline whose register stage ran into its own store (tracking URI in its params)."""
    from tasks.dvc import apply_overrides
    from yolofps.config import load_config
    from yolofps.stages import register

    root = copy_run(shared_run, tmp_path_factory.mktemp("predict") / "project")
    apply_overrides(root / "params.yaml", {"mlflow.tracking_uri": f"sqlite:///{root / 'mlflow.db'}"})
    result = register.run(load_config(root / "params.yaml"), Paths(root))
    return root, result.metrics["version"]


def test_a_registered_model_by_alias_and_by_version(registered, tmp_path, capsys):
    root, version = registered
    variant = bench_json(root)["selected"]["name"]
    images = formats.list_images(val_folder(root))
    expected = one_by_one(row_detector(root, variant), images)
    for uri in (f"models:/{NAME}@challenger", f"models:/{NAME}/{version}"):
        out = tmp_path / uri.replace("/", "_").replace(":", "").replace("@", "_")
        assert predict(root, val_folder(root), out, "--model", uri, "--format", "json", "--no-save") == 0
        assert f"predict: {uri} = v{version}, bench variant {variant}" in capsys.readouterr().out
        assert_same_detections(json.loads((out / "detections.json").read_text())["detections"], expected)


def test_the_default_model_is_the_registered_champion_and_its_absence_says_what_is_there(registered, tmp_path,
                                                                                        capsys):
    root, version = registered
    assert predict(root, val_folder(root), tmp_path / "out") == 2
    (line,) = error_lines(capsys)
    assert line.startswith(f"yolofps: error: --model models:/{NAME}@champion: ")
    assert f"models:/{NAME}@challenger (v{version})" in line and "yolofps promote" in line
    assert not (tmp_path / "out").exists()  # nothing written for a model that did not open


def test_the_console_script_writes_numbered_run_folders(registered, tmp_path):
    root, _ = registered
    yolofps = str(Path(sys.executable).parent / "yolofps")
    for number in (1, 2):
        result = run_cmd([yolofps, "predict", str(val_folder(root)), "--model", "selected", "--no-save"], root)
        assert f"-> runs/predict/{number}" in result.stdout, result.stdout
    assert sorted(p.name for p in (root / "runs" / "predict" / "2").iterdir()) == ["detections.csv"]


@pytest.mark.parametrize(("model", "says"), [
    ("nonsense", "no such file or folder, and not a variant of"),
    ("models:/nothing", "a registered model is models:/NAME@ALIAS or models:/NAME/VERSION"),
    (f"models:/{NAME}/99", "not found"),
    ("models:/other-model@champion", "no model named 'other-model' is registered there"),
    ("models", "not a yolofps checkpoint folder"),
    ("weights.pt", "yolofps import FILE.pt --out DIR"),
])
def test_bad_models_exit_2_with_one_line(registered, tmp_path, capsys, monkeypatch, model, says):
    root, _ = registered
    monkeypatch.chdir(root)
    if model.endswith(".pt"):
        (root / model).write_bytes(b"not a checkpoint")
    assert predict(root, val_folder(root), tmp_path / "out", "--model", model) == 2
    (line,) = error_lines(capsys)
    assert line.startswith("yolofps: error: ") and says in line, line


def test_bad_sources_and_settings_exit_2_before_the_model_loads(shared_run, tmp_path, capsys):
    root = shared_run.root
    for source, says in ((tmp_path / "missing", "no such file or folder"), (f"{tmp_path}/*.jpg", "no file matches"),
                         ("7", "camera 7: OpenCV cannot open it")):
        assert predict(root, source, tmp_path / "out", "--model", "no-such-model") == 2
        (line,) = error_lines(capsys)
        assert says in line, line
    empty = tmp_path / "empty"
    empty.mkdir()
    assert predict(root, empty, tmp_path / "out", "--model", "selected") == 2
    assert "holds no files" in error_lines(capsys)[0]
    assert predict(root, val_folder(root), tmp_path / "out", "--model", "selected", "--conf", "1.5") == 2
    assert "--conf must be in [0, 1]" in error_lines(capsys)[0]


def test_an_unreachable_tracking_server_is_a_temporary_failure_in_one_line(shared_run, tmp_path, capsys):
    from tasks.dvc import apply_overrides

    params = tmp_path / "params.yaml"
    params.write_text((shared_run.root / "params.yaml").read_text())
    apply_overrides(params, {"mlflow.tracking_uri": f"http://127.0.0.1:{free_port()}", "register.retries": 1})
    assert cli.main(["predict", str(val_folder(shared_run.root)), "--params", str(params), "--out",
                     str(tmp_path / "out"), "--model", f"models:/{NAME}@champion"]) == 75
    (line,) = error_lines(capsys)
    assert "failed after 1 attempts" in line and "rerun when the tracking server is back" in line


def test_the_predict_vs_bench_benchmark_writes_its_side_by_side_table(shared_run, tmp_path, capsys):
    sys.path.insert(0, str(PROJECT_ROOT / "benchmarks"))
    import predict_vs_bench

    out = tmp_path / "result.json"
    predict_vs_bench.main(["--project", str(shared_run.root), "--rounds", "1", "--no-save", "--out", str(out)])
    result = json.loads(out.read_text())
    images = len(formats.list_images(val_folder(shared_run.root)))
    assert result["benchmark"] == "predict_vs_bench" and result["settings"]["images"] == images
    assert result["settings"]["variant"] == bench_json(shared_run.root)["selected"]["name"]
    assert [r["phase"] for r in result["results"]] == ["pre", "model", "post", "total"]
    for row in result["results"]:
        assert row["predict"]["median"] > 0 and row["bench"]["median"] > 0
        assert row["ratio"]["median"] == round(row["predict"]["median"] / row["bench"]["median"], 3)
    assert f"target: every ratio within 10%: {'met' if result['met'] else 'NOT met'}" in capsys.readouterr().out
