"""Fine-tuning through a real MONAI Label server: candidates, publishing, kept versions and rollback.

The served model is a ``tiny`` MSA2-Net trained here for only 16 epochs on synthetic volumes (so a
proper fine-tuning beats it); the datastore holds other synthetic volumes with their labels. Run
with the label environment (``bundle/docs/monailabel.md``)::

    .venv-label/bin/python -m pytest tests/label/test_finetune_versions.py -q
"""

from __future__ import annotations

import hashlib
import re
import shutil
import sys
from pathlib import Path

import pytest

monailabel = pytest.importorskip(
    "monailabel", reason="MONAI Label environment not installed (see bundle/docs/monailabel.md)"
)

import requests  # noqa: E402
import torch  # noqa: E402
from label_server import MODEL, ROOT, TINY_OVERRIDES, Server, load_serve, train_tiny  # noqa: E402

from msa2net.data.synthetic import make_volume_dataset  # noqa: E402

sys.path.insert(0, str(ROOT / "label" / "app"))
from weights_registry import RegistryError, WeightsRegistry  # noqa: E402

SLICER_MODULE = Path(sys.prefix) / "monailabel" / "plugins" / "slicer" / "MONAILabel" / "MONAILabel.py"
IMAGES = [f"case_{i:03d}" for i in range(5)]


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def slicer_train_stats_keys() -> set[str]:
    """The keys 3D Slicer's MONAI Label module (shipped with monailabel) reads from ``/info``'s train stats."""
    return set(re.findall(r"train_stats\.get\(\s*[\"'](\w+)[\"']", SLICER_MODULE.read_text()))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    train = root / "train"
    make_volume_dataset(str(train), num_cases=4, num_validation=1, shape=(64, 64, 10), num_classes=3, seed=3)
    weights = train_tiny(root, train, epochs=16)
    load_serve().prepare_bundle(
        root / "app" / "model" / MODEL, profile="synthetic", weights=weights, overrides=TINY_OVERRIDES
    )
    data = root / "annotated"
    make_volume_dataset(str(data), num_cases=len(IMAGES), num_validation=0, shape=(64, 64, 10), num_classes=3, seed=21)
    studies = root / "studies"
    studies.mkdir()
    for case in IMAGES:
        shutil.copyfile(data / "imagesTr" / f"{case}.nii.gz", studies / f"{case}.nii.gz")
    server = Server(root, studies, "--keep-versions", "2")
    server.labels = {case: data / "labelsTr" / f"{case}.nii.gz" for case in IMAGES}
    try:
        yield server
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------------
def test_registry_keeps_the_last_versions_and_rolls_back(tmp_path):
    registry = WeightsRegistry(str(tmp_path), keep=2)
    (tmp_path / "model.pt").write_bytes(b"shipped")
    assert registry.served() == "shipped" and registry.files() == ["model.pt"]
    for i in range(3):
        (tmp_path / "new.pt").write_bytes(f"w{i}".encode())
        assert registry.publish(str(tmp_path / "new.pt"), {"candidate_metric": i}) == f"v{i + 1:04d}"
    assert registry.names() == ["shipped", "v0002", "v0003"] and not (tmp_path / "model_v0001.pt").exists()
    assert registry.served() == "v0003" and registry.files() == ["model_v0003.pt", "model_v0002.pt", "model.pt"]
    assert registry.serve("v0002") == {"served": "v0002", "previous": "v0003"}
    assert registry.served_path() == str(tmp_path / "model_v0002.pt")
    assert (tmp_path / "model_v0002.pt").read_bytes() == b"w1"
    with pytest.raises(RegistryError, match="no published version 'v0001'"):
        registry.serve("v0001")
    assert registry.serve("shipped")["served"] == "shipped"
    assert registry.served_path() == str(tmp_path / "model.pt")
    # A new registry object (another process) reads the same state; numbering never reuses a version.
    again = WeightsRegistry(str(tmp_path), keep=2)
    (tmp_path / "new.pt").write_bytes(b"w3")
    assert again.publish(str(tmp_path / "new.pt"), {}) == "v0004" and registry.served() == "v0004"


def test_one_labelled_image_without_pretrained_weights_gives_a_kept_candidate(tiny, tmp_path):
    client = tiny.client(tmp_path)
    shipped = _sha256(tiny.models / "model.pt")
    client.save_label(IMAGES[0], str(tiny.labels[IMAGES[0]]), tag="final")
    # "pretrained" is offered by /info; unticked, training starts from the bundle's initialisation.
    stats = tiny.train(client, {"max_epochs": 1, "pretrained": False})
    assert stats["published"] is False and stats["source_weights"] is None
    assert "no held-out labelled image" in stats["reason"] and "at least 2 labelled images" in stats["reason"]
    assert stats["heldout_images"] == [] and (tiny.models / "model_candidate.pt").is_file()
    _, params = client.infer(MODEL, IMAGES[1], {})
    assert params["model_file"] == "model.pt" and _sha256(tiny.models / "model.pt") == shipped


def test_broken_finetune_is_not_published_and_slicer_sees_progress(tiny, tmp_path):
    client = tiny.client(tmp_path)
    for case in IMAGES[1:]:
        client.save_label(case, str(tiny.labels[case]), tag="final")
    running = []

    def watch(info):
        stats = info["train_stats"][MODEL]
        if stats.get("status") == "RUNNING" and stats.get("epoch", 0) >= 1:
            running.append(stats)

    stats = tiny.train(client, {"max_epochs": 3, "learning_rate": 1.0e4}, on_poll=watch)
    keys = slicer_train_stats_keys()
    assert keys >= {"epoch", "total_epochs", "best_metric", "total_time"}, keys
    assert running, "no /info during training showed a finished epoch"
    # While it runs: epoch and total for the progress bar; no total_time (the module shows 0 progress when present).
    assert all(keys - {"total_time"} <= set(s) and "total_time" not in s for s in running), running
    assert running[-1]["total_epochs"] == 3 and 1 <= running[-1]["epoch"] <= 3
    assert keys <= set(stats) and stats["epoch"] == stats["total_epochs"] == 3

    assert stats["published"] is False and stats["weights"] == "model_candidate.pt"
    assert len(stats["heldout_images"]) == 1 and stats["train_images"] == 4
    assert stats["served_metric"] > 0 and not (stats["candidate_metric"] or 0) >= stats["served_metric"], stats
    assert stats["reason"].startswith("not published"), stats["reason"]
    assert stats["served_version"] == "shipped"
    _, params = client.infer(MODEL, IMAGES[0], {})
    assert params["model_file"] == "model.pt"


def test_good_finetune_is_published_and_served(tiny, tmp_path):
    client = tiny.client(tmp_path)
    shipped = _sha256(tiny.models / "model.pt")
    stats = tiny.train(client, {"max_epochs": 20, "learning_rate": 0.05})
    assert stats["published"] is True, stats
    assert stats["version"] == "v0001" and stats["weights"] == "model_v0001.pt"
    assert stats["candidate_metric"] >= stats["served_metric"], stats
    assert stats["best_metric"] == stats["candidate_metric"]
    _, params = client.infer(MODEL, IMAGES[0], {})
    assert params["model_file"] == "model_v0001.pt"
    assert params["model_sha256"] == _sha256(tiny.models / "model_v0001.pt") == stats["sha256"]
    assert _sha256(tiny.models / "model.pt") == shipped, "the shipped weights were modified"
    before = torch.load(tiny.models / "model.pt", map_location="cpu", weights_only=True)["model"]
    after = torch.load(tiny.models / "model_v0001.pt", map_location="cpu", weights_only=True)["model"]
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_rollback_switches_the_served_version(tiny, tmp_path):
    client = tiny.client(tmp_path)
    url = f"{tiny.url}/versions/{MODEL}"
    listing = requests.get(url, timeout=30).json()
    assert listing["served"] == "v0001" and [v["version"] for v in listing["versions"]] == ["v0001"]
    assert listing["keep"] == 2 and listing["versions"][0]["candidate_metric"] >= listing["versions"][0]["served_metric"]

    assert requests.put(url, params={"serve": "shipped"}, timeout=30).json() == {"served": "shipped", "previous": "v0001"}
    _, params = client.infer(MODEL, IMAGES[0], {})
    assert params["model_file"] == "model.pt"
    assert client.info()["train_stats"][MODEL]["served_version"] == "shipped"

    requests.put(url, params={"serve": "v0001"}, timeout=30).raise_for_status()
    _, params = client.infer(MODEL, IMAGES[0], {})
    assert params["model_file"] == "model_v0001.pt"
    # A single request can still name other kept weights.
    _, params = client.infer(MODEL, IMAGES[0], {"model_filename": "model.pt"})
    assert params["model_file"] == "model.pt"

    response = requests.put(url, params={"serve": "v0042"}, timeout=30)
    assert response.status_code == 404 and response.json()["detail"].startswith("no published version 'v0042'")
    assert requests.get(f"{tiny.url}/versions/other_model", timeout=30).status_code == 404
