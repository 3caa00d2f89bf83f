"""MONAI Label server: do ``/info`` and the training status answer while an inference runs; concurrent vs sequential.

Starts the real server (``label/serve.py``, this project's app, shipped weights) on a free loopback
port with one ACDC volume (a synthetic one when the shared data is absent), then:

* **responsiveness**: while one ``/infer`` runs, ``GET /info/`` and ``GET /train/?check_if_running=true``
  (the status calls 3D Slicer polls) are sent one after another from another thread; every latency is recorded
  (target: each under 1 s);
* **throughput**: ``--requests`` inferences one after another, then the same number sent at once
  (one thread each); total wall time of both (target: concurrent not slower in total).

Run with the label environment (``bundle/docs/monailabel.md``) from the repository root::

    PYTHONPATH=custom .venv-label/bin/python benchmarks/bench_label.py   # writes benchmarks/results/label_<machine>.{json,md}
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "label"))
from common import env_header, env_info, md_table, write_results  # noqa: E402
from label_server import MODEL, Server, load_serve, real  # noqa: E402


def infer(url: str, image_id: str) -> float:
    """Seconds for one ``/infer`` returning the label map."""
    start = time.perf_counter()
    response = requests.post(f"{url}/infer/{MODEL}", params={"image": image_id, "output": "image"}, timeout=600)
    response.raise_for_status()
    return time.perf_counter() - start


def poll_during_inference(url: str, image_id: str, paths: list[str]) -> dict[str, list[float]]:
    """Latencies of GETs on ``paths``, sent back to back while one inference runs."""
    done = threading.Event()
    latencies: dict[str, list[float]] = {p: [] for p in paths}

    def run_inference():
        try:
            infer(url, image_id)
        finally:
            done.set()

    worker = threading.Thread(target=run_inference)
    worker.start()
    time.sleep(0.05)  # let the inference start
    while not done.is_set():
        for path in paths:
            start = time.perf_counter()
            response = requests.get(f"{url}{path}", timeout=60)
            latencies[path].append(time.perf_counter() - start)
            # MONAI Label answers the training check with 404 "No Train Tasks are currently Running" when idle.
            assert response.status_code in (200, 404), (path, response.status_code, response.text)
    worker.join()
    return latencies


def summary(values: list[float]) -> dict:
    a = np.asarray(values)
    return {
        "n": int(a.size),
        "p50_s": round(float(np.percentile(a, 50)), 4),
        "max_s": round(float(a.max()), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=8, help="inferences in the throughput comparison")
    parser.add_argument("--rounds", type=int, default=5, help="inferences during which status calls are timed")
    parser.add_argument("--name", default=None, help="result file name (default label_<cpu|card>)")
    args = parser.parse_args()

    env = env_info()
    machine = "cpu" if not env.get("card") else env["card"].split()[-1].lower()
    name = args.name or f"label_{machine}"
    root = Path(tempfile.mkdtemp(prefix="bench_label_"))
    studies = root / "studies"
    studies.mkdir()
    acdc = real("acdc", "imagesTr", "patient002_frame01.nii.gz")
    if acdc:
        image_id = "patient002_frame01"
        shutil.copyfile(acdc, studies / f"{image_id}.nii.gz")
    else:
        from msa2net.data.synthetic import make_volume_dataset

        image_id = "case_000"
        make_volume_dataset(str(root / "synth"), num_cases=1, num_validation=0, shape=(232, 256, 10), num_classes=4)
        shutil.copyfile(root / "synth" / "imagesTr" / "case_000.nii.gz", studies / "case_000.nii.gz")
    load_serve().prepare_bundle(root / "app" / "model" / MODEL)
    server = Server(root, studies)
    try:
        infer(server.url, image_id)  # warm: weights loaded, caches filled
        single = [infer(server.url, image_id) for _ in range(3)]

        # What 3D Slicer's module polls: the app info and whether a training runs.
        paths = ["/info/", "/train/?check_if_running=true"]
        polled: dict[str, list[float]] = {p: [] for p in paths}
        for _ in range(args.rounds):
            for path, values in poll_during_inference(server.url, image_id, paths).items():
                polled[path].extend(values)

        start = time.perf_counter()
        for _ in range(args.requests):
            infer(server.url, image_id)
        sequential = time.perf_counter() - start
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.requests) as pool:
            latencies = list(pool.map(lambda _: infer(server.url, image_id), range(args.requests)))
        concurrent = time.perf_counter() - start
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)

    results = {
        "env": env,
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "image": image_id,
        "single_infer_s": [round(s, 4) for s in single],
        "status_calls_during_inference": {p: summary(v) for p, v in polled.items()},
        "status_calls_under_1s": all(max(v) < 1.0 for v in polled.values()),
        "requests": args.requests,
        "sequential_total_s": round(sequential, 3),
        "concurrent_total_s": round(concurrent, 3),
        "concurrent_over_sequential": round(concurrent / sequential, 3),
        "concurrent_latency_s": summary(latencies),
    }
    rows = [
        {"call during one /infer": p, "calls": s["n"], "p50 s": s["p50_s"], "max s": s["max_s"]}
        for p, s in results["status_calls_during_inference"].items()
    ]
    throughput = [
        {
            "inferences": args.requests,
            "one after another, total s": results["sequential_total_s"],
            "all at once, total s": results["concurrent_total_s"],
            "ratio": results["concurrent_over_sequential"],
            "all at once, max latency s": results["concurrent_latency_s"]["max_s"],
        }
    ]
    markdown = (
        f"# MONAI Label server: responsiveness and concurrency\n\n{env_header(env)}\n\n"
        f"Shipped weights, image `{image_id}`; one `/infer` alone: {', '.join(f'{s:.2f}' for s in single)} s; "
        f"1-minute load average at the end: {results['load_average_1min_at_end']} (other jobs share the cores).\n\n"
        + md_table(rows, list(rows[0]))
        + "\n\n"
        + md_table(throughput, list(throughput[0]))
        + "\n"
    )
    write_results(name, results, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
