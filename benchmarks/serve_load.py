"""The model server under load: `mlflow models serve` on the registered pyfunc against `yolofps serve`.

    python benchmarks/serve_load.py --project /work/demo [--model models:/yolofps-detector@challenger]
        [--servers mlflow,yolofps] [--levels 1,4,16] [--requests 2000] [--timeout-s 600]

Each server is started as a subprocess on 127.0.0.1 over the project's MLflow store, one at a time, and driven from
this process (asyncio + aiohttp) with the project's val images: at each concurrency level, `--requests` requests
(or until `--timeout-s`), one image each. mlflow gets the pyfunc's REST input (a DataFrame of base64 image strings,
`dataframe_split`), yolofps the raw file bytes. Per level: req/s (= img/s), p50/p95/p99 client-side latency,
errors, the server's RSS (its whole process tree) at the start and end. Then a bad-request mix (garbage bytes, a
truncated JPEG, a 12000x12000 PNG, a wrong content type, a wrong JSON schema / an empty or oversize body)
interleaved with good requests at 4 clients: every bad one must be 4xx, every good one 200, the server up after.
The targets (issue 19, at 16 clients): 0 errors, p99 <= 5 x p50, throughput >= 70 % of the bench stage's best
batch throughput for the same variant (the project's metrics/bench.json). Writes benchmarks/results/serve_load.json
(with the environment stamp) and serve_load.png (latency vs concurrency). Client and server share this machine's
cores: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from yolofps import history
from yolofps.bench.environment import cpu_flags, device_name, write_result
from yolofps.config import load_config
from yolofps.data import formats
from yolofps.paths import Paths
from yolofps.registry import resolve_tracking_uri

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RESULTS = PROJECT_ROOT / "benchmarks" / "results"
TARGETS = {"concurrency": 16, "max_p99_over_p50": 5.0, "min_throughput_vs_bench": 0.7}


@dataclass(frozen=True)
class Server:
    """A server under test: how to start it, where it answers, and how a request body is made."""

    name: str  # mlflow | yolofps
    command: list[str]
    port: int
    predict_path: str
    health_path: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(self, image: bytes) -> tuple[bytes, dict[str, str]]:
        """One image as this server's request: the pyfunc's JSON DataFrame (base64), or the raw bytes."""
        if self.name == "mlflow":
            body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(image).decode()]]}}
            return json.dumps(body).encode(), {"Content-Type": "application/json"}
        return image, {"Content-Type": "image/jpeg"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_server(name: str, model: str, project: Path, options: argparse.Namespace) -> Server:
    """The command line of one server under test, on a free loopback port."""
    port = free_port()
    if name == "mlflow":  # one worker, as yolofps serve is one process
        command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model, "--env-manager", "local",
                   "--host", "127.0.0.1", "-p", str(port), "--workers", "1"]
        return Server(name, command, port, "/invocations", "/ping")
    command = [sys.executable, "-m", "yolofps.cli", "serve", "--model", model, "--params",
               str(project / "params.yaml"), "--port", str(port), "--max-wait-ms", str(options.max_wait_ms)]
    if options.max_batch:
        command += ["--max-batch", str(options.max_batch)]
    return Server(name, command, port, "/predict", "/health")


def start(server: Server, project: Path, tracking_uri: str, timeout: float = 300) -> subprocess.Popen:
    """Start the server in its own process group and wait until its health route answers."""
    env = os.environ | {"MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = Path(tempfile.gettempdir()) / f"serve_load_{server.name}_{server.port}.log"
    with open(log, "w") as output:  # the child keeps its own descriptor
        process = subprocess.Popen(server.command, cwd=project, env=env, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(server.url + server.health_path, timeout=2)
            return process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                stop(process)
                raise RuntimeError(f"{server.name} did not come up; see {log}") from None
            time.sleep(0.5)


def stop(process: subprocess.Popen) -> None:
    """End the server's process group (mlflow models serve runs uvicorn as a child)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process and its children (MB), or None once it is gone."""
    import psutil

    try:
        root = psutil.Process(pid)
        return round(sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20, 1)
    except psutil.Error:
        return None


def health(server: Server) -> dict[str, Any] | None:
    """The server's health answer (JSON for yolofps; mlflow's /ping answers an empty body), None when down."""
    try:
        with urllib.request.urlopen(server.url + server.health_path, timeout=5) as answer:
            text = answer.read().decode().strip()
            return json.loads(text) if text else {}
    except (OSError, ValueError):
        return None


async def drive(server: Server, payloads: list[tuple[bytes, dict]], concurrency: int, count: int,
                timeout_s: float) -> tuple[list[float], list[int], float]:
    """`count` requests from `concurrency` clients (each waits for its answer) -> latencies (ms), statuses, wall s."""
    import aiohttp

    latencies, statuses, sent = [], [], iter(range(count))
    deadline = time.perf_counter() + timeout_s
    url = server.url + server.predict_path
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        async def client() -> None:
            for index in sent:
                if time.perf_counter() > deadline:
                    return
                body, headers = payloads[index % len(payloads)]
                begin = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as answer:
                        await answer.read()
                        status = answer.status
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    status = 0  # no answer: a dropped connection, a timeout
                latencies.append((time.perf_counter() - begin) * 1000)
                statuses.append(status)

        begin = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
    return latencies, statuses, time.perf_counter() - begin


def level_row(server: Server, concurrency: int, measured: tuple[list[float], list[int], float],
              rss: tuple[float | None, float | None]) -> dict[str, Any]:
    """One level's figures: throughput of the answered-200 requests, latency percentiles over all requests."""
    latencies, statuses, wall = measured
    ok = sum(status == 200 for status in statuses)
    p50, p95, p99 = (round(float(np.percentile(latencies, q)), 3) for q in (50, 95, 99)) if latencies else [None] * 3
    return {"server": server.name, "concurrency": concurrency, "requests": len(statuses), "ok": ok,
            "errors": len(statuses) - ok, "wall_s": round(wall, 3), "throughput": round(ok / wall, 2) if wall else 0,
            "p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "rss_mb_start": rss[0], "rss_mb_end": rss[1]}


def batching(before: dict | None, after: dict | None) -> dict[str, Any]:
    """yolofps serve's batches during a level (from /health): how many, and the mean images per batch."""
    if not before or "batches" not in before or not after:
        return {}
    batches, served = after["batches"] - before["batches"], after["served"] - before["served"]
    return {"batches": batches, "mean_batch": round(served / batches, 2) if batches else None}


def bad_requests(server: Server, good: bytes, huge_png: bytes) -> dict[str, tuple[bytes, dict[str, str]]]:
    """kind -> a request the server must refuse with a 4xx."""
    truncated = good[: len(good) // 2]
    garbage = random.Random(0).randbytes(4096)
    common = {"garbage bytes": (garbage, server.request(good)[1]), "truncated JPEG": server.request(truncated),
              "12000x12000 PNG": server.request(huge_png), "wrong content type": (good, {"Content-Type": "text/plain"})}
    if server.name == "mlflow":
        wrong = {"dataframe_split": {"columns": ["picture"], "data": [[base64.b64encode(good).decode()]]}}
        return common | {"wrong JSON schema": (json.dumps(wrong).encode(), {"Content-Type": "application/json"})}
    return common | {"empty body": (b"", {"Content-Type": "image/jpeg"}),
                     "17 MiB body": (b"\0" * (17 * 2**20), {"Content-Type": "image/jpeg"})}


def huge_png(side: int = 12000) -> bytes:
    """A side x side black PNG: a small file (~0.4 MB) that decodes to side^2 x 3 bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (side, side)).save(buffer, format="PNG")
    return buffer.getvalue()


async def bad_mix(server: Server, goods: list[bytes], rounds: int) -> dict[str, Any]:
    """`rounds` of every bad kind shuffled among as many good requests, 4 clients: status counts per kind."""
    import aiohttp

    kinds = bad_requests(server, goods[0], huge_png())
    plan = [(kind, *kinds[kind]) for kind in kinds for _ in range(rounds)]
    plan += [("good", *server.request(goods[i % len(goods)])) for i in range(len(plan))]
    random.Random(1).shuffle(plan)
    statuses: dict[str, dict[str, int]] = {}
    queue = iter(plan)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        async def client() -> None:
            for kind, body, headers in queue:
                try:
                    async with session.post(server.url + server.predict_path, data=body, headers=headers) as answer:
                        await answer.read()
                        status = str(answer.status)
                except (aiohttp.ClientError, asyncio.TimeoutError) as err:
                    status = f"no answer ({err.__class__.__name__})"
                counts = statuses.setdefault(kind, {})
                counts[status] = counts.get(status, 0) + 1

        await asyncio.gather(*(client() for _ in range(4)))
    good_ok = statuses.get("good", {}).get("200", 0) == sum(statuses.get("good", {}).values())
    bad_ok = all(status.startswith("4") for kind, counts in statuses.items() if kind != "good" for status in counts)
    return {"statuses": statuses, "good_all_200": good_ok, "bad_all_4xx": bad_ok}


def measure_server(server: Server, project: Path, tracking_uri: str, images: list[bytes],
                   args: argparse.Namespace) -> dict[str, Any]:
    """Start one server, warm it up, run every level and the bad mix, stop it."""
    payloads = [server.request(image) for image in images]
    process = start(server, project, tracking_uri)
    try:
        asyncio.run(drive(server, payloads, 1, args.warmup, args.timeout_s))
        about, levels = health(server) or {}, []
        for concurrency in args.levels:
            before, rss_start = health(server), rss_mb(process.pid)
            measured = asyncio.run(drive(server, payloads, concurrency, args.requests, args.timeout_s))
            row = level_row(server, concurrency, measured, (rss_start, rss_mb(process.pid)))
            levels.append(row | batching(before, health(server)))
            print(f"  {server.name} x{concurrency}: {row['throughput']} req/s, p50 {row['p50_ms']} ms, "
                  f"p99 {row['p99_ms']} ms, errors {row['errors']}", flush=True)
        mix = asyncio.run(bad_mix(server, images, args.bad_rounds))
        mix["alive_after"] = health(server) is not None and process.poll() is None
        mix["rss_mb_after"] = rss_mb(process.pid)
    finally:
        stop(process)
    return {"about": about, "levels": levels, "bad_mix": mix}


def registered(tracking_uri: str, model: str) -> tuple[int, dict[str, str]]:
    """The registered version a models:/NAME@ALIAS or models:/NAME/VERSION URI names, and its tags."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    name, _, ref = model.removeprefix("models:/").replace("@", "/@").partition("/")
    version = client.get_model_version_by_alias(name, ref[1:]) if ref.startswith("@") else \
        client.get_model_version(name, ref)
    return int(version.version), dict(version.tags)


def bench_best(project: Path, variant: str) -> dict[str, Any] | None:
    """The bench stage's best batch throughput (img/s, end to end) of `variant`, from metrics/bench.json."""
    bench = json.loads(Paths(project).metrics("bench").read_text())
    row = next((v for v in bench["variants"] if v["name"] == variant), None)
    if not row or not row.get("throughput"):
        return None
    batch, throughput = max(row["throughput"].items(), key=lambda item: item[1])
    return {"variant": variant, "batch": int(batch), "throughput": throughput, "fps_b1": row.get("fps_b1"),
            "bench_time_utc": bench["environment"].get("time_utc"), "bench_cpu": bench["environment"].get("cpu")}


def target_checks(levels: list[dict], bench: dict | None) -> dict[str, Any]:
    """Issue 19's targets at 16 clients: 0 errors, p99 <= 5 x p50, throughput >= 70 % of the bench's best batch."""
    row = next((r for r in levels if r["concurrency"] == TARGETS["concurrency"]), None)
    if row is None or row["p50_ms"] is None:
        return {"measured": False}
    ratio = round(row["throughput"] / bench["throughput"], 3) if bench else None
    return {"measured": True, "zero_errors": row["errors"] == 0,
            "p99_over_p50": round(row["p99_ms"] / row["p50_ms"], 2),
            "p99_within_5x_p50": row["p99_ms"] <= TARGETS["max_p99_over_p50"] * row["p50_ms"],
            "throughput_vs_bench": ratio,
            "throughput_within_70pct": None if ratio is None else ratio >= TARGETS["min_throughput_vs_bench"]}


def history_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One benchmark-history row per server and level of a serve_load result (the JSON this script writes)."""
    settings, rows = result["settings"], []
    for level in result["results"]:
        about = result["servers"][level["server"]]["about"]
        rows.append({"source": f"serve:{level['server']}", "variant": settings["variant"],
                     "runtime": about.get("runtime", settings["runtime"]),
                     "dtype": about.get("dtype", settings["dtype"]),
                     "batch": about.get("options", {}).get("max_batch", 1), "imgsz": int(settings["imgsz"]),
                     "threads": int(about.get("threads", settings["threads"])), "p50_ms": level["p50_ms"],
                     "p95_ms": level["p95_ms"], "p99_ms": level["p99_ms"], "throughput": level["throughput"],
                     "extra": {k: level.get(k) for k in ("concurrency", "errors", "requests", "rss_mb_start",
                                                         "rss_mb_end", "mean_batch")}})
    return rows


def record_history(result: dict[str, Any], project: Path, store_url: str, tags: dict[str, str]) -> int:
    """Append the levels to the benchmark history (bench.store): one measuring run, one row per server and level."""
    settings = result["settings"]
    run = history.MeasuringRun.start("serve", project, {k: settings[k] for k in ("levels", "requests", "max_wait_ms")})
    identity = {"device_name": device_name(result["environment"]), "cpu_flags": tuple(cpu_flags()),
                "model_hash": tags.get("content_hash"), "model_name": settings["model_name"],
                "model_version": int(settings["version"]), "mode": tags.get("mode")}
    rows = [dataclasses.replace(run.measurement(**identity, **{k: v for k, v in row.items() if k != "source"}),
                                source=row["source"]) for row in history_rows(result)]
    store = history.open_store(store_url, root=project)
    count = store.append(rows)
    print(f"appended {count} rows of run {run.run_id} to {store.url}")
    return count


def table(result: dict[str, Any]) -> str:
    """The levels as a fixed-width table, and the target checks and bad mix per server."""
    lines = [f"{'server':<8} {'clients':>7} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>6} "
             f"{'batch':>5} {'RSS MB':>15}"]
    for r in result["results"]:
        lines.append(f"{r['server']:<8} {r['concurrency']:>7} {r['throughput']:>8} {r['p50_ms']!s:>8} "
                     f"{r['p95_ms']!s:>8} {r['p99_ms']!s:>8} {r['errors']:>6} {r.get('mean_batch') or 1!s:>5} "
                     f"{'{}->{}'.format(r['rss_mb_start'], r['rss_mb_end']):>15}")
    bench = result["bench"]
    if bench:
        lines.append(f"bench stage, {bench['variant']}: best {bench['throughput']} img/s at batch {bench['batch']}")
    for name, measured in result["servers"].items():
        checks, mix = measured["targets"], measured["bad_mix"]
        lines.append(f"{name}: targets at 16 clients {json.dumps(checks)}")
        lines.append(f"{name}: bad mix good_all_200={mix['good_all_200']} bad_all_4xx={mix['bad_all_4xx']} "
                     f"alive_after={mix['alive_after']} {json.dumps(mix['statuses'])}")
    return "\n".join(lines)


def figure(result: dict[str, Any], path: Path) -> Path:
    """p50 and p99 latency against concurrent clients, one line pair per server (log latency axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, color in zip(result["servers"], ("tab:orange", "tab:blue"), strict=False):
        rows = [r for r in result["results"] if r["server"] == name]
        clients = [r["concurrency"] for r in rows]
        ax.plot(clients, [r["p50_ms"] for r in rows], "o-", color=color, label=f"{name} p50")
        ax.plot(clients, [r["p99_ms"] for r in rows], "s--", color=color, label=f"{name} p99")
    settings = result["settings"]
    ax.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="latency per request (ms)",
           title=f"{settings['variant']} @{settings['imgsz']}, {result['environment']['cpu']} "
                 f"x{result['environment']['cpu_cores']}")
    ax.set_xticks(sorted({r["concurrency"] for r in result["results"]}), labels=None)
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", default=str(PROJECT_ROOT), help="a project that has run the pipeline")
    parser.add_argument("--model", default="", help="models:/ URI (default: the project's registered @challenger)")
    parser.add_argument("--servers", default="mlflow,yolofps")
    parser.add_argument("--levels", default="1,4,16", type=lambda text: [int(x) for x in text.split(",")])
    parser.add_argument("--requests", type=int, default=2000, help="requests per level")
    parser.add_argument("--warmup", type=int, default=50, help="untimed requests before the first level")
    parser.add_argument("--timeout-s", type=float, default=600, help="time limit per level")
    parser.add_argument("--bad-rounds", type=int, default=5, help="requests of each bad kind in the bad mix")
    parser.add_argument("--max-batch", type=int, default=0, help="yolofps serve --max-batch (default: its own)")
    parser.add_argument("--max-wait-ms", type=float, default=2.0, help="yolofps serve --max-wait-ms")
    parser.add_argument("--out", default=str(RESULTS / "serve_load.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    project = Path(args.project).resolve()
    cfg = load_config(project / "params.yaml")
    tracking_uri = resolve_tracking_uri(cfg.mlflow.tracking_uri, project)
    model = args.model or f"models:/{cfg.register.model_name}@challenger"
    version, tags = registered(tracking_uri, model)
    images = [p.read_bytes() for p in formats.list_images(Paths(project).augmented_data / "images" / "val")]
    bench = bench_best(project, tags["variant"])
    print(f"{model} = v{version} ({tags['variant']}); {len(images)} val images; bench best {bench}", flush=True)
    servers: dict[str, Any] = {}
    for name in args.servers.split(","):
        server = make_server(name, model, project, args)
        servers[name] = measure_server(server, project, tracking_uri, images, args)
        servers[name]["targets"] = target_checks(servers[name]["levels"], bench)
    settings = {"project": str(project), "model": model, "model_name": cfg.register.model_name, "version": version,
                "variant": tags["variant"],
                "runtime": tags.get("runtime"), "dtype": tags.get("dtype"), "imgsz": tags.get("imgsz"),
                "threads": tags.get("threads", "0"), "levels": args.levels, "requests": args.requests,
                "images": len(images), "max_wait_ms": args.max_wait_ms, "client": "aiohttp, this process"}
    rows = [row for measured in servers.values() for row in measured["levels"]]
    out = write_result(args.out, "serve_load", settings, rows, bench=bench, servers=servers)
    result = json.loads(out.read_text())
    print(table(result))
    figure(result, out.with_suffix(".png"))
    record_history(result, project, cfg.bench.store, tags)
    passed = all(m["bad_mix"]["good_all_200"] and m["bad_mix"]["bad_all_4xx"] and m["bad_mix"]["alive_after"]
                 for m in servers.values())
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
