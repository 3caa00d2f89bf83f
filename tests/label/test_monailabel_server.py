"""The MSA2-Net bundle served by a real MONAI Label server, driven through MONAI Label's own client and plain HTTP.

Run with the label environment (``bundle/docs/monailabel.md``)::

    .venv-label/bin/python -m pytest tests/label -q

The module starts ``label/serve.py`` (the documented server command) as a subprocess on a free
loopback port, with a bundle folder exported by ``export_bundle``. Its weights are the shipped
``bundle/models/model.pt`` when it exists (ACDC profile), else a ``tiny`` MSA2-Net trained here for
real on synthetic volumes, with the exported configs adjusted to ``profile_synthetic.json``
(``MSA2NET_LABEL_WEIGHTS=synthetic`` forces the latter; ``MSA2NET_LABEL_WEIGHTS=/path/model.pt`` serves
that checkpoint with the default ACDC profile). Real volumes (ACDC, CT) are read from the shared data
folder when present; synthetic volumes stand in otherwise. Fine-tuning, publishing and rollback are
tested in ``test_finetune_versions.py``.

Everything is skipped when ``monailabel`` is not importable (the main environment).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

monailabel = pytest.importorskip(
    "monailabel", reason="MONAI Label environment not installed (see bundle/docs/monailabel.md)"
)

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import requests  # noqa: E402
from label_server import (  # noqa: E402
    MODEL,
    ROOT,
    SHIPPED_WEIGHTS,
    TINY_OVERRIDES,
    Server,
    load_serve,
    real,
    run,
    train_tiny,
)
from monailabel.client.client import MONAILabelClientException  # noqa: E402

from msa2net.data.synthetic import make_volume_dataset  # noqa: E402
from msa2net.terminology import term_for  # noqa: E402

GUIDE = ROOT / "bundle" / "docs" / "monailabel.md"


def _label_array(path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def _error_of(call) -> MONAILabelClientException:
    with pytest.raises(MONAILabelClientException) as info:
        call()
    return info.value


class Served:
    """What the module fixture set up: the server, the images and their roles."""

    def __init__(self, server: Server, profile: str):
        self.server = server
        self.bundle = server.bundle
        self.studies = server.studies
        self.url = server.url
        self.proc = server.proc
        self.profile = profile
        self.compare: dict[str, Path] = {}  # image id -> file, segmented by /infer and by `run inference`
        self.labels: dict[str, Path] = {}  # reference labels of the synthetic study images

    def client(self, tmpdir: Path):
        return self.server.client(tmpdir)

    def log_tail(self, n: int = 4000) -> str:
        return self.server.log_tail(n)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("monailabel")
    serve = load_serve()
    choice = os.environ.get("MSA2NET_LABEL_WEIGHTS", "auto")
    bundle = root / "app" / "model" / MODEL

    # --- the bundle folder in the app's model dir, exactly as label/serve.py would export it
    if choice not in ("auto", "synthetic"):
        profile, classes = "acdc", 4
        serve.prepare_bundle(bundle, weights=choice)
    elif choice == "auto" and SHIPPED_WEIGHTS.is_file():
        profile, classes = "acdc", 4
        serve.prepare_bundle(bundle)
    else:
        synth = root / "synthetic_train"
        make_volume_dataset(str(synth), num_cases=5, num_validation=1, shape=(64, 64, 10), num_classes=3, seed=3)
        weights = train_tiny(root, synth, epochs=10)
        profile, classes = "synthetic", 3
        serve.prepare_bundle(bundle, profile="synthetic", weights=weights, overrides=TINY_OVERRIDES)

    # --- the studies folder: real volumes where available, synthetic ones always
    studies = root / "studies"
    studies.mkdir()
    extra = root / "synthetic_studies"
    make_volume_dataset(str(extra), num_cases=4, num_validation=0, shape=(80, 72, 8), num_classes=classes, seed=11)
    labels, compare = {}, {}
    for case in ("case_000", "case_001", "case_002"):
        shutil.copyfile(extra / "imagesTr" / f"{case}.nii.gz", studies / f"synth_{case}.nii.gz")
        labels[f"synth_{case}"] = extra / "labelsTr" / f"{case}.nii.gz"
    compare["synth_case_000"] = studies / "synth_case_000.nii.gz"
    acdc, ct = real("acdc", "imagesTr", "patient002_frame01.nii.gz"), real("ct", "example_ct_112.nii.gz")
    if acdc:
        shutil.copyfile(acdc, studies / "patient002_frame01.nii.gz")
        compare["patient002_frame01"] = studies / "patient002_frame01.nii.gz"
    if ct:
        shutil.copyfile(ct, studies / "example_ct_112.nii.gz")
        compare["example_ct_112"] = studies / "example_ct_112.nii.gz"

    server = Server(root, studies)
    s = Served(server, profile)
    s.compare, s.labels = compare, labels
    try:
        yield s
    finally:
        server.stop()


def _bundle_inference(served: Served, files: list[Path], out: Path, ckpt: Path) -> dict[str, Path]:
    """``python -m monai.bundle run inference`` on copies of ``files``, with the served bundle and ``ckpt``."""
    inputs = out / "inputs"
    inputs.mkdir(parents=True)
    for f in files:
        shutil.copyfile(f, inputs / f.name)
    bundle = served.bundle
    run(
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
    # Segment names: the terminology's display names, Slicer's anatomy names for the ventricles (Slicer colours by name).
    if served.profile == "acdc":
        expected = {"Right ventricle of heart": 1, "Myocardium": 2, "Left ventricle of heart": 3}
    else:
        expected = {term_for(n, int(i)).display.capitalize(): int(i) for i, n in channels.items() if n != "background"}
    assert MODEL in info["models"], info["models"].keys()
    model = info["models"][MODEL]
    assert model["labels"] == expected
    assert model["type"] == "segmentation"
    assert info["labels"] == [n for n, _ in sorted(expected.items(), key=lambda kv: kv[1])]
    assert MODEL in info["trainers"]
    assert {"random", "first"} <= set(info["strategies"])
    assert not any(name.startswith("sam") for name in info["models"]), "SAM2 must be off (offline)"
    assert info["datastore"]["total"] == len(list(served.studies.glob("*.nii.gz")))


def test_acdc_segments_get_slicer_colours(served, tmp_path):
    """The Slicer module colours a segment from its GenericAnatomyColors table, looked up by the lower-cased name."""
    if served.profile != "acdc":
        pytest.skip("ACDC class names only")
    plugin = Path(sys.prefix) / "monailabel" / "plugins" / "slicer" / "MONAILabel"
    source = (plugin / "MONAILabel.py").read_text()
    assert "GenericAnatomyColors.get(name.lower())" in source, "the module no longer colours segments by name"
    spec = importlib.util.spec_from_file_location("labelcolors", plugin / "MONAILabelLib" / "labelcolors.py")
    colours = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(colours)
    labels = served.client(tmp_path).info()["models"][MODEL]["labels"]
    coloured = {name for name in labels if name.lower() in colours.GenericAnatomyColors}
    assert coloured == {"Right ventricle of heart", "Left ventricle of heart"}, labels


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


def test_result_file_survives_when_client_and_server_share_the_machine(served):
    """The client's default tmpdir is the server's: the result must not be the file the server deletes."""
    client = monailabel.client.MONAILabelClient(served.url)
    result, _ = client.infer(MODEL, "synth_case_000", {})
    assert Path(result).is_file() and nib.load(result).shape == nib.load(str(served.compare["synth_case_000"])).shape
    Path(result).unlink()


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


def test_dicom_style_volume_names_are_accepted(served, tmp_path):
    """3D Slicer names a DICOM-loaded volume "<series number>: <description>" and uploads it under that id."""
    client = served.client(tmp_path)
    image = served.compare["synth_case_000"]
    name = "3: Cine SAX"
    assert client.upload_image(str(image), image_id=name)["image"] == name
    result, _ = client.infer(MODEL, name, {})
    assert nib.load(result).shape == nib.load(str(image)).shape
    assert client.save_label(name, str(served.labels["synth_case_000"]), tag="final")["label"] == name
    assert "final" in client.datastore()["objects"][name]["labels"]
    e = _error_of(lambda: client.upload_image(str(image), image_id="../escape"))
    assert "400" in e.msg and "'../escape'" in e.msg, e.msg


def _nifti_bytes(array: np.ndarray) -> bytes:
    return gzip.compress(nib.Nifti1Image(array, np.eye(4)).to_bytes())


def _bad_infer_requests(served) -> dict[str, tuple[dict, int, str]]:
    """name -> (requests.post keyword arguments for /infer/msa2net, expected status, text the message names)."""
    good = served.compare["synth_case_000"].read_bytes()
    return {
        "text upload": ({"files": {"file": ("notes.nii.gz", b"this is not an image\n" * 50)}}, 422, "'notes.nii.gz' is not a readable image"),
        "text file type": ({"files": {"file": ("notes.txt", b"hello")}}, 415, "'notes.txt': unsupported type"),
        "truncated upload": ({"files": {"file": ("cut.nii.gz", good[: len(good) // 2])}}, 422, "'cut.nii.gz' is not a readable image"),
        "4D upload": (
            {"files": {"file": ("cine4d.nii.gz", _nifti_bytes(np.zeros((16, 16, 4, 3), np.float32)))}},
            422,
            "'cine4d.nii.gz' has shape (16, 16, 4, 3)",
        ),
        "no image": ({}, 400, "no image given"),
        "malformed params": ({"params": {"image": "synth_case_000"}, "data": {"params": "{not json"}}, 400, "params is not valid JSON"),
        "params not an object": ({"params": {"image": "synth_case_000"}, "data": {"params": "[1, 2]"}}, 400, "params must be a JSON object"),
        "unknown image": ({"params": {"image": "no_such_image"}}, 404, "'no_such_image' is not in the datastore"),
        "unknown session": ({"params": {"session_id": "no-such-session"}}, 404, "session 'no-such-session' does not exist"),
    }


BAD_INFER = [
    "text upload", "text file type", "truncated upload", "4D upload", "no image",
    "malformed params", "params not an object", "unknown image", "unknown session",
]  # fmt: skip


def _assert_client_error(served, response: requests.Response, status: int, names: str) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail, detail
    assert names in detail, detail
    roots = {Path(p).parts[1] for p in (served.server.root, ROOT, sys.prefix, "/tmp")}
    assert not re.search(rf"/({'|'.join(map(re.escape, roots))})\b", detail), f"a server path in the message: {detail}"
    # ... and the server keeps serving.
    assert requests.get(f"{served.url}/info/", timeout=30).status_code == 200


@pytest.mark.parametrize("case", BAD_INFER)
def test_bad_infer_request_gets_4xx(served, case):
    kwargs, status, names = _bad_infer_requests(served)[case]
    response = requests.post(f"{served.url}/infer/{MODEL}", timeout=120, **kwargs)
    _assert_client_error(served, response, status, names)


def test_unknown_activelearning_strategy_gets_404(served):
    response = requests.post(f"{served.url}/activelearning/most_uncertain", json={}, timeout=30)
    _assert_client_error(served, response, 404, "strategy 'most_uncertain' does not exist; strategies: ['first', 'random']")


def test_bad_datastore_requests_get_clear_http_errors(served, tmp_path):
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
    e = _error_of(lambda: client.save_label("synth_case_001", str(wrong), tag="final"))
    assert "422" in e.msg and "shape" in e.msg and str(tuple(image.shape)) in e.msg, e.msg
    out_of_range = tmp_path / "out_of_range.nii.gz"
    nib.save(nib.Nifti1Image(np.full(image.shape, 200, np.uint8), image.affine), str(out_of_range))
    e = _error_of(lambda: client.save_label("synth_case_001", str(out_of_range), tag="final"))
    assert "422" in e.msg and "values" in e.msg, e.msg
    e = _error_of(lambda: client.save_label("no_such_image", str(wrong), tag="final"))
    assert "404" in e.msg and "not in the datastore" in e.msg, e.msg
    assert "final" not in client.datastore()["objects"]["synth_case_001"].get("labels", {})

    # ... and the server keeps serving.
    assert MODEL in client.info()["models"]
    result, params = client.infer(MODEL, "synth_case_000", {})
    assert nib.load(result).shape == image.shape


def test_concurrent_infers_all_succeed_with_the_same_result(served, tmp_path):
    image_id = "patient002_frame01" if "patient002_frame01" in served.compare else "synth_case_000"
    expected = _label_array(served.client(tmp_path / "one").infer(MODEL, image_id, {})[0])

    def one(i: int):
        return served.client(tmp_path / f"r{i}").infer(MODEL, image_id, {})[0]

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, range(8)))
    for result in results:
        assert np.array_equal(_label_array(result), expected)
    assert served.proc.poll() is None


def _guide_blocks() -> list[str]:
    """The indented shell command blocks of section 6 of the guide (the client and HTTP examples)."""
    text = GUIDE.read_text()
    section = text[text.index("## 6.") : text.index("## 7.")]
    blocks, current = [], []
    for line in section.splitlines():
        if line.startswith("    "):
            current.append(line[4:])
        elif current and line.strip() == "":
            current.append("")
        elif current:
            blocks.append("\n".join(current).strip() + "\n")
            current = []
    if current:
        blocks.append("\n".join(current).strip() + "\n")
    return blocks


def test_guide_examples_run_as_written(served, tmp_path):
    """Section 6 of bundle/docs/monailabel.md, run on the server's machine (only the port differs)."""
    blocks = _guide_blocks()
    assert len(blocks) >= 2, blocks
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    port = served.url.rsplit(":", 1)[1]
    # The guide's commands run from the repository root, where the label environment is `.venv-label`.
    (tmp_path / ".venv-label").symlink_to(Path(sys.prefix), target_is_directory=True)
    for block in blocks:
        script = block.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{script}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{served.log_tail()}"
        if "MONAILabelClient" in script:
            out = proc.stdout
            assert "Right ventricle of heart" in out or served.profile != "acdc", out
            assert "DONE" in out and ("published" in out), out
    assert (tmp_path / "label.nii.gz").is_file() and nib.load(str(tmp_path / "label.nii.gz")).shape
