"""The MSA2-Net bundle served by a real MONAI Label server, driven through MONAI Label's own client.

Run with the label environment (``bundle/docs/monailabel.md``)::

    .venv-label/bin/python -m pytest tests/label -q

The module starts ``label/serve.py`` (the documented server command) as a subprocess on a free
loopback port, with a bundle folder exported by ``export_bundle``. Its weights are the shipped
``bundle/models/model.pt`` when it exists (ACDC profile), else a ``tiny`` MSA2-Net trained here for
real on synthetic volumes, with the exported configs adjusted to ``profiles/synthetic.json``
(``MSA2NET_LABEL_WEIGHTS=synthetic`` forces the latter; ``MSA2NET_LABEL_WEIGHTS=/path/model.pt`` serves
that checkpoint with the default ACDC profile). Real volumes (ACDC, CT) are read from
``../shared/data`` when present; synthetic volumes stand in otherwise.

Everything is skipped when ``monailabel`` is not importable (the main environment).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

monailabel = pytest.importorskip(
    "monailabel", reason="MONAI Label environment not installed (see bundle/docs/monailabel.md)"
)

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from monailabel.client import MONAILabelClient  # noqa: E402
from monailabel.client.client import MONAILabelClientException  # noqa: E402

from msa2net.data.synthetic import make_volume_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "bundle"
SERVE = ROOT / "label" / "serve.py"
SHIPPED_WEIGHTS = BUNDLE / "models" / "model.pt"
SHARED_DATA = Path(os.environ.get("MSA2NET_SHARED_DATA", ROOT.parent / "shared" / "data"))
RESULTS = Path(os.environ.get("MSA2NET_LABEL_RESULTS", ROOT / "label" / "results.json"))
MODEL = "msa2net"
#: Config the fixture's tiny model is trained and served with: the synthetic profile at 64x64 slices (faster).
TINY_OVERRIDES = {"spatial_size": [64, 64]}
STARTUP_TIMEOUT = 240
TRAIN_TIMEOUT = 420


def _load_serve():
    spec = importlib.util.spec_from_file_location("msa2net_label_serve", SERVE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _run(cmd: list[str], cwd: Path, timeout: int = 600) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )


def _real(*parts: str) -> Path | None:
    path = SHARED_DATA.joinpath(*parts)
    return path if path.exists() else None


def _label_array(path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def _error_of(call) -> MONAILabelClientException:
    with pytest.raises(MONAILabelClientException) as info:
        call()
    return info.value


class Served:
    """What the module fixture set up: folders, the server process, the images and their roles."""

    def __init__(self, root: Path):
        self.root = root
        self.app = root / "app"
        self.bundle = self.app / "model" / MODEL
        self.studies = root / "studies"
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.log = root / "server.log"
        self.profile = ""
        self.weights_note = ""
        self.compare: dict[str, Path] = {}  # image id -> file, segmented by /infer and by `run inference`
        self.finetune: tuple[Path, Path] | None = None  # image and corrected label uploaded for fine-tuning
        self.labels: dict[str, Path] = {}  # reference labels of the synthetic study images

    def client(self, tmpdir: Path) -> MONAILabelClient:
        tmpdir.mkdir(parents=True, exist_ok=True)
        return MONAILabelClient(self.url, tmpdir=str(tmpdir))

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


def _train_tiny(root: Path, data: Path) -> Path:
    """Train the tiny preset for a few epochs with the synthetic profile, through `monai.bundle run training`."""
    run = root / "tiny_run"
    config = "['configs/train.json','configs/profiles/synthetic.json']"
    _run(
        [
            sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", config,
            "--dataset_dir", str(data), "--max_epochs", "10", "--val_interval", "5", "--batch_size", "8",
            "--slices_per_volume", "8", "--num_workers", "0", "--spatial_size", json.dumps(TINY_OVERRIDES["spatial_size"]),
            "--ckpt_dir", str(run / "models"), "--output_dir", str(run / "eval"),
        ],
        cwd=BUNDLE,
    )  # fmt: skip
    weights = run / "models" / "model.pt"
    assert weights.is_file(), f"training wrote no {weights}"
    return weights


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("monailabel")
    s = Served(root)
    serve = _load_serve()
    choice = os.environ.get("MSA2NET_LABEL_WEIGHTS", "auto")

    # --- the bundle folder in the app's model dir, exactly as label/serve.py would export it
    if choice not in ("auto", "synthetic"):
        s.profile, s.weights_note = "acdc", f"{choice} (ACDC profile)"
        serve.prepare_bundle(s.bundle, weights=choice)
        synth_classes = 4
    elif choice == "auto" and SHIPPED_WEIGHTS.is_file():
        s.profile, s.weights_note = "acdc", "shipped bundle/models/model.pt (ACDC profile)"
        serve.prepare_bundle(s.bundle)
        synth_classes = 4
    else:
        synth = root / "synthetic_train"
        make_volume_dataset(str(synth), num_cases=5, num_validation=1, shape=(64, 64, 10), num_classes=3, seed=3)
        weights = _train_tiny(root, synth)
        s.profile = "synthetic"
        s.weights_note = "tiny preset, 64x64 slices, trained for 10 epochs on 4 synthetic volumes in the test fixture"
        serve.prepare_bundle(s.bundle, profile="synthetic", weights=weights, overrides=TINY_OVERRIDES)
        synth_classes = 3

    # --- the studies folder: real volumes where available, synthetic ones always
    s.studies.mkdir()
    extra = root / "synthetic_studies"
    make_volume_dataset(
        str(extra), num_cases=4, num_validation=0, shape=(80, 72, 8), num_classes=synth_classes, seed=11
    )
    for case in ("case_000", "case_001", "case_002"):
        shutil.copyfile(extra / "imagesTr" / f"{case}.nii.gz", s.studies / f"synth_{case}.nii.gz")
        s.labels[f"synth_{case}"] = extra / "labelsTr" / f"{case}.nii.gz"
    s.compare["synth_case_000"] = s.studies / "synth_case_000.nii.gz"
    acdc, ct = _real("acdc", "imagesTr", "patient002_frame01.nii.gz"), _real("ct", "example_ct_112.nii.gz")
    if acdc:
        shutil.copyfile(acdc, s.studies / "patient002_frame01.nii.gz")
        s.compare["patient002_frame01"] = s.studies / "patient002_frame01.nii.gz"
    if ct:
        shutil.copyfile(ct, s.studies / "example_ct_112.nii.gz")
        s.compare["example_ct_112"] = s.studies / "example_ct_112.nii.gz"
    # The image and "corrected" label uploaded for fine-tuning (the reference label stands in for the correction).
    acdc_pair = (
        _real("acdc", "imagesTr", "patient003_frame01.nii.gz"),
        _real("acdc", "labelsTr", "patient003_frame01.nii.gz"),
    )
    if s.profile == "acdc" and all(acdc_pair):
        s.finetune = acdc_pair
    else:
        s.finetune = (extra / "imagesTr" / "case_003.nii.gz", extra / "labelsTr" / "case_003.nii.gz")

    # --- the server: the documented command, on a free loopback port
    port = _free_port()
    s.url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, str(SERVE), "--app-dir", str(s.app), "--studies", str(s.studies), "--port", str(port)]
    # Sessions (volumes uploaded without entering the datastore) go to the test's folder, not ~/.cache.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MONAI_LABEL_SESSION_PATH": str(root / "sessions")}
    with open(s.log, "w") as log:
        s.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        client = s.client(root / "probe")
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if s.proc.poll() is not None:
                raise AssertionError(f"server exited with {s.proc.returncode}:\n{s.log_tail()}")
            try:
                client.info()
                break
            except (OSError, MONAILabelClientException):
                if time.monotonic() > deadline:
                    raise AssertionError(f"server not answering after {STARTUP_TIMEOUT} s:\n{s.log_tail()}") from None
                time.sleep(1.0)
        yield s
    finally:
        _stop(s.proc)


def _stop(proc: subprocess.Popen | None) -> None:
    """Stop the server and everything it started (its training subprocesses share its process group)."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _bundle_inference(served: Served, files: list[Path], out: Path, ckpt: Path) -> dict[str, Path]:
    """``python -m monai.bundle run inference`` on copies of ``files``, with the served bundle and ``ckpt``."""
    inputs = out / "inputs"
    inputs.mkdir(parents=True)
    for f in files:
        shutil.copyfile(f, inputs / f.name)
    bundle = served.bundle
    _run(
        [
            sys.executable, "-m", "monai.bundle", "run", "inference",
            "--config_file", str(bundle / "configs" / "inference.json"),
            "--meta_file", str(bundle / "configs" / "metadata.json"),
            "--bundle_root", str(bundle), "--dataset_dir", str(inputs),
            "--output_dir", str(out / "pred"), "--ckpt_path", str(ckpt),
        ],
        cwd=bundle,
    )  # fmt: skip
    return {
        f.name.removesuffix(".nii.gz"): out / "pred" / f"{f.name.removesuffix('.nii.gz')}_seg.nii.gz" for f in files
    }


@pytest.fixture(scope="module")
def reference(served, tmp_path_factory) -> dict[str, Path]:
    """`run inference` outputs of the compared images with the bundle's shipped weights (models/model.pt)."""
    out = tmp_path_factory.mktemp("run_inference")
    return _bundle_inference(served, list(served.compare.values()), out, served.bundle / "models" / "model.pt")


def _check_same_as_reference(result: Path, image: Path, reference: Path) -> np.ndarray:
    img, res, ref = nib.load(str(image)), nib.load(str(result)), nib.load(str(reference))
    assert res.shape == img.shape, f"label map shape {res.shape} != image shape {img.shape}"
    np.testing.assert_allclose(res.affine, img.affine, atol=1e-4, err_msg="label map affine != image affine")
    np.testing.assert_allclose(ref.affine, img.affine, atol=1e-4)
    got, want = _label_array(result), _label_array(reference)
    assert got.shape == want.shape
    mismatch = int(np.count_nonzero(got != want))
    assert mismatch == 0, f"{mismatch} of {got.size} voxels differ from `run inference`"
    return got


# ------------------------------------------------------------------------------------------------
def test_info_lists_model_with_label_names(served, tmp_path):
    info = served.client(tmp_path).info()
    meta = json.loads((served.bundle / "configs" / "metadata.json").read_text())
    channels = next(iter(meta["network_data_format"]["outputs"].values()))["channel_def"]
    expected = {name.lower(): int(i) for i, name in channels.items() if name != "background"}
    assert MODEL in info["models"], info["models"].keys()
    model = info["models"][MODEL]
    assert model["labels"] == expected
    assert model["type"] == "segmentation"
    assert info["labels"] == [n for n, _ in sorted(expected.items(), key=lambda kv: kv[1])]
    assert MODEL in info["trainers"]
    assert {"random", "first"} <= set(info["strategies"])
    assert not any(name.startswith("sam") for name in info["models"]), "SAM2 must be off (offline)"
    assert info["datastore"]["total"] == len(list(served.studies.glob("*.nii.gz")))


def test_infer_matches_bundle_run_inference(served, reference, tmp_path):
    client = served.client(tmp_path)
    classes = {}
    for image_id, image in served.compare.items():
        result, params = client.infer(MODEL, image_id, {})
        assert result and Path(result).is_file(), params
        assert params["model_file"] == "model.pt"
        assert params["label_names"] == client.info()["models"][MODEL]["labels"]
        got = _check_same_as_reference(Path(result), image, reference[image_id])
        assert got.dtype == np.uint8 and got.max() < len(params["label_names"]) + 1
        classes[image_id] = np.unique(got).tolist()
    # A volume that is only on the annotator's computer: uploaded as a session (3D Slicer does so) or with the request.
    image = served.compare["synth_case_000"]
    session = client.create_session(str(image))
    result, _ = client.infer(MODEL, "", {}, session_id=session["session_id"])
    _check_same_as_reference(Path(result), image, reference["synth_case_000"])
    result, _ = client.infer(MODEL, "", {}, file=str(image))
    _check_same_as_reference(Path(result), image, reference["synth_case_000"])
    # The comparison means something only if the model segments something.
    assert any(len(c) > 1 for c in classes.values()), f"only background predicted: {classes}"


def test_activelearning_returns_next_unlabeled_image(served, tmp_path):
    client = served.client(tmp_path)
    labelled = "synth_case_002"
    client.save_label(labelled, str(served.labels[labelled]), tag="final")

    objects = client.datastore()["objects"]
    unlabeled = {k for k, v in objects.items() if "final" not in v.get("labels", {})}
    assert labelled not in unlabeled and unlabeled
    first = client.next_sample("first", {})
    assert first["id"] == sorted(unlabeled)[0]
    assert Path(first["path"]).is_file()
    for _ in range(2 * len(unlabeled) + 1):  # more picks than images, within about a second
        sample = client.next_sample("random", {})
        assert sample["id"] in unlabeled, sample


def test_bad_requests_get_clear_http_errors(served, tmp_path):
    client = served.client(tmp_path)

    e = _error_of(lambda: client.infer(MODEL, "no_such_image", {}))
    assert "404" in e.msg and "no_such_image" in e.msg and "not in the datastore" in e.msg, e.msg
    e = _error_of(lambda: client.infer("no_such_model", "synth_case_000", {}))
    assert "404" in e.msg and "no_such_model" in e.msg, e.msg

    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"this is not an image\n" * 200)
    e = _error_of(lambda: client.upload_image(str(corrupt), image_id="corrupt_upload"))
    assert "422" in e.msg and "not a readable image" in e.msg, e.msg
    truncated = tmp_path / "truncated.nii.gz"
    data = served.compare["synth_case_000"].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    e = _error_of(lambda: client.upload_image(str(truncated), image_id="truncated_upload"))
    assert "422" in e.msg and "not a readable image" in e.msg, e.msg
    objects = client.datastore()["objects"]
    assert "corrupt_upload" not in objects and "truncated_upload" not in objects

    image = nib.load(str(served.compare["synth_case_000"]))
    wrong = tmp_path / "wrong_shape.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 12, 3), np.uint8), image.affine), str(wrong))
    e = _error_of(lambda: client.save_label("synth_case_000", str(wrong), tag="final"))
    assert "422" in e.msg and "shape" in e.msg and str(tuple(image.shape)) in e.msg, e.msg
    out_of_range = tmp_path / "out_of_range.nii.gz"
    nib.save(nib.Nifti1Image(np.full(image.shape, 200, np.uint8), image.affine), str(out_of_range))
    e = _error_of(lambda: client.save_label("synth_case_000", str(out_of_range), tag="final"))
    assert "422" in e.msg and "values" in e.msg, e.msg
    e = _error_of(lambda: client.save_label("no_such_image", str(wrong), tag="final"))
    assert "404" in e.msg and "not in the datastore" in e.msg, e.msg
    assert "final" not in client.datastore()["objects"]["synth_case_000"].get("labels", {})

    # ... and the server keeps serving.
    assert MODEL in client.info()["models"]
    result, params = client.infer(MODEL, "synth_case_000", {})
    assert nib.load(result).shape == image.shape


def test_concurrent_infer_load(served, tmp_path):
    image_id = "patient002_frame01" if "patient002_frame01" in served.compare else "synth_case_000"
    server = psutil.Process(served.proc.pid)
    client = served.client(tmp_path / "warm")
    t = time.perf_counter()
    expected = _label_array(client.infer(MODEL, image_id, {})[0])
    single = time.perf_counter() - t
    rss_before = server.memory_info().rss

    def one(i: int):
        c = served.client(tmp_path / f"r{i}")
        start = time.perf_counter()
        result, params = c.infer(MODEL, image_id, {})
        return time.perf_counter() - start, result

    n = 16
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=n) as pool:
        outcomes = list(pool.map(one, range(n)))
    wall = time.perf_counter() - start
    rss_after = server.memory_info().rss
    latencies = np.array([o[0] for o in outcomes])
    for _, result in outcomes:
        assert np.array_equal(_label_array(result), expected)

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(_benchmark_record(served, image_id, n, single, latencies, wall, rss_before, rss_after), indent=2)
        + "\n"
    )
    assert len(outcomes) == n and served.proc.poll() is None


def _benchmark_record(served, image_id, n, single, latencies, wall, rss_before, rss_after) -> dict:
    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    shape = list(nib.load(str(served.compare[image_id])).shape)
    config = json.loads((served.bundle / "configs" / "inference.json").read_text())
    return {
        "benchmark": "MONAI Label /infer/msa2net, 16 concurrent requests through MONAILabelClient",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "machine": {
            "name": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, no GPU"
            if not torch.cuda.is_available()
            else platform.node(),
            "cpu": cpu,
            "cores": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "monai": __import__("monai").__version__,
            "monailabel": monailabel.__version__,
        },
        "server": {"url": "http://127.0.0.1:<free port>", "app": "label/app (label/serve.py)", "device": "cpu"},
        "model": {
            "profile": served.profile,
            "preset": config.get("model_preset"),
            "spatial_size": config.get("spatial_size"),
            "weights": served.weights_note,
            "weights_sha256": _sha256(served.bundle / "models" / "model.pt"),
        },
        "image": {"id": image_id, "shape": shape},
        "requests": n,
        "concurrency": n,
        "succeeded": n,
        "single_request_s": round(single, 3),
        "latency_s": {
            "p50": round(float(np.percentile(latencies, 50)), 3),
            "p95": round(float(np.percentile(latencies, 95)), 3),
            "min": round(float(latencies.min()), 3),
            "max": round(float(latencies.max()), 3),
        },
        "wall_s": round(wall, 3),
        "throughput_per_s": round(n / wall, 3),
        "server_rss_mib": {"before": round(rss_before / 2**20, 1), "after": round(rss_after / 2**20, 1)},
        "note": "monailabel 0.8.5 runs /infer inside its async endpoint, so one server process segments one request at a time; latencies are queueing + compute. Measured, not asserted.",
    }


def test_finetune_from_datastore_and_infer_with_new_weights(served, reference, tmp_path):
    client = served.client(tmp_path)
    models = served.bundle / "models"
    shipped = (models / "model.pt").read_bytes()
    image, label = served.finetune

    # Fetch-segment-correct-submit, as the 3D Slicer module does: upload, run the model, submit the correction.
    assert client.upload_image(str(image), image_id="finetune_case")["image"] == "finetune_case"
    draft, _ = client.infer(MODEL, "finetune_case", {})
    assert nib.load(draft).shape == nib.load(str(image)).shape
    saved = client.save_label("finetune_case", str(label), tag="final")
    assert saved["label"] == "finetune_case"
    assert "final" in client.datastore()["objects"]["finetune_case"]["labels"]

    task = client.train_start(MODEL, {"max_epochs": 2, "val_split": 0.0})
    assert task.get("status") in ("SUBMITTED", "RUNNING"), task
    deadline = time.monotonic() + TRAIN_TIMEOUT
    status = task
    while status.get("status") in ("SUBMITTED", "RUNNING"):
        assert time.monotonic() < deadline, f"training still running after {TRAIN_TIMEOUT} s: {status}"
        time.sleep(2.0)
        status = client.train_status()
    assert status["status"] == "DONE", f"{status}\n{served.log_tail()}"

    finetuned = models / "model_finetuned.pt"
    assert finetuned.is_file()
    assert (models / "model.pt").read_bytes() == shipped, "the shipped weights were modified"
    before = torch.load(models / "model.pt", map_location="cpu", weights_only=True)["model"]
    after = torch.load(finetuned, map_location="cpu", weights_only=True)["model"]
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before), "fine-tuning did not change the weights"
    summary = json.loads((models / "finetune" / "finetune.json").read_text())
    assert summary["weights"] == "model_finetuned.pt" and summary["source_weights"] == "model.pt"
    trained_lr = json.loads((served.bundle / "configs" / "train.json").read_text())["learning_rate"]
    assert summary["max_epochs"] == 2 and summary["learning_rate"] == pytest.approx(trained_lr / 10)

    # The next /infer uses the new weights, exactly as `run inference --ckpt_path models/model_finetuned.pt` does.
    image_id = next(iter(served.compare))
    result, params = client.infer(MODEL, image_id, {})
    assert params["model_file"] == "model_finetuned.pt" and params["model_sha256"] == _sha256(finetuned)
    new_ref = _bundle_inference(served, [served.compare[image_id]], tmp_path / "ref_ft", finetuned)
    _check_same_as_reference(Path(result), served.compare[image_id], new_ref[image_id])
    # The shipped weights stay selectable.
    result, params = client.infer(MODEL, image_id, {"model_filename": "model.pt"})
    assert params["model_file"] == "model.pt"
    _check_same_as_reference(Path(result), served.compare[image_id], reference[image_id])
    assert (models / "model.pt").read_bytes() == shipped
    assert MODEL in client.info()["models"]
