"""The inference engine overlaps reading, inference and writing of consecutive cases, and keeps every promise
of the one-case-at-a-time engine: bad cases fail alone, outputs keep the input's geometry, logs keep case order."""

from __future__ import annotations

import json
import logging
import threading

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from conftest import BUNDLE
from msa2net.inference import CaseByCaseInference, InputFolder
from msa2net.atomic import PARTIAL_PREFIX


class ThresholdNet(torch.nn.Module):
    """Two-class 'network': foreground where the (normalised) intensity is above 0.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fg = (x[:, :1] - 0.5) * 20
        return torch.cat([-fg, fg], dim=1)


class Timeline:
    """What happened, in the order it happened, in any thread."""

    def __init__(self) -> None:
        self._lock, self.events = threading.Lock(), []

    def __call__(self, event: str) -> None:
        with self._lock:
            self.events.append(event)

    def before(self, first: str, then: str) -> bool:
        return self.events.index(first) < self.events.index(then)


class RecordingNet(ThresholdNet):
    """Records the start and end of each call; the second call waits for ``hold`` (at most a minute).

    ``held`` tells whether ``hold`` was set during that wait, so what must happen during an inference is
    waited for instead of hoped for from timing.
    """

    def __init__(self, timeline: Timeline, hold: threading.Event | None = None) -> None:
        super().__init__()
        self.timeline, self.hold, self.calls, self.held = timeline, hold, 0, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.timeline(f"infer {self.calls} start")
        if self.calls == 2 and self.hold is not None:
            self.held = self.hold.wait(timeout=60)
        out = super().forward(x)
        self.timeline(f"infer {self.calls} end")
        return out


GOOD = {  # name: (shape, affine)
    "a_good": ((40, 36, 5), np.diag([-0.8, -0.8, 3.0, 1.0])),
    "b_good": ((33, 48, 4), np.array([[0.0, 1.1, 0.0, 5.0], [0.9, 0.0, 0.0, -7.0], [0.0, 0.0, 2.5, 1.0], [0, 0, 0, 1]])),
    "d_good": ((50, 30, 6), np.diag([1.2, 1.2, 2.0, 1.0])),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Three good volumes and, third in order, a truncated one."""
    folder = tmp_path_factory.mktemp("overlap_in")
    rng = np.random.default_rng(0)
    for name, (shape, affine) in GOOD.items():
        data = rng.normal(0, 1, shape).astype(np.float32)
        data[4:20, 6:22] += 6.0  # an object
        nib.save(nib.Nifti1Image(data, affine), folder / f"{name}.nii.gz")
    raw = (folder / "a_good.nii.gz").read_bytes()
    (folder / "c_corrupt.nii.gz").write_bytes(raw[: len(raw) // 2])
    ckpt = folder.parent / "threshold.pt"
    torch.save({"model": {}}, ckpt)
    return folder, ckpt


def engine(folder, ckpt, out, network, prefetch: bool | None = True, **kw) -> CaseByCaseInference:
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    parser.update({
        "bundle_root": str(BUNDLE), "class_names": ["object"], "spatial_size": [32, 32], "output_dir": str(out),
        "device": "$torch.device('cpu')", "allow_input_mismatch": True,
    })
    parts = {k: parser.get_parsed_content(k) for k in ("preprocessing", "inferer", "postprocessing", "image_pattern")}
    dataset = InputFolder(folder, parts["preprocessing"], parts["image_pattern"])
    return CaseByCaseInference(dataset, network, parts["inferer"], parts["postprocessing"], str(ckpt), str(out), "cpu", prefetch=prefetch, **kw)


def run_logged(eng, caplog) -> tuple[int, list[str]]:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="msa2net.inference"), pytest.raises(SystemExit) as exit_info:
        eng.run()
    return exit_info.value.code, [r.getMessage() for r in caplog.records if r.name == "msa2net.inference"]


@pytest.mark.parametrize("prefetch", [True, False])
def test_bad_case_fails_alone_in_order_and_outputs_keep_geometry(inputs, tmp_path, caplog, prefetch):
    folder, ckpt = inputs
    out = tmp_path / "out"
    code, lines = run_logged(engine(folder, ckpt, out, ThresholdNet(), prefetch), caplog)
    assert code == 1
    cases = [line for line in lines if line.startswith("[")]
    assert [c.split("]")[0] + "]" for c in cases] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    assert [("segmented" in c, c.split()[2].split("/")[-1]) for c in cases] == [
        (True, "a_good.nii.gz"), (True, "b_good.nii.gz"), (False, "c_corrupt.nii.gz:"), (True, "d_good.nii.gz")]
    assert "Compressed file ended" in cases[2] and "\n" not in cases[2]
    summary = json.loads((out / "inference_summary.json").read_text())
    assert [s["image"].split("/")[-1] for s in summary["done"]] == ["a_good.nii.gz", "b_good.nii.gz", "d_good.nii.gz"]
    assert [(f["image"].split("/")[-1], "Compressed file ended" in f["error"]) for f in summary["failed"]] == [("c_corrupt.nii.gz", True)]
    assert sorted(p.name for p in out.iterdir()) == ["a_good_seg.nii.gz", "b_good_seg.nii.gz", "d_good_seg.nii.gz", "inference_summary.json"]
    for name, (shape, affine) in GOOD.items():
        seg = nib.load(out / f"{name}_seg.nii.gz")
        assert seg.shape == shape and seg.get_data_dtype() == np.uint8
        np.testing.assert_allclose(seg.affine, affine, atol=1e-5)
        assert 0 < np.asarray(seg.dataobj).mean() < 1  # the object, and background


def test_prefetch_on_and_off_write_identical_outputs(inputs, tmp_path, caplog):
    folder, ckpt = inputs
    for prefetch in (True, False):
        run_logged(engine(folder, ckpt, tmp_path / str(prefetch), ThresholdNet(), prefetch), caplog)
    for name in GOOD:
        on, off = (nib.load(tmp_path / str(p) / f"{name}_seg.nii.gz") for p in (True, False))
        assert on.header.binaryblock == off.header.binaryblock
        assert np.array_equal(np.asarray(on.dataobj), np.asarray(off.dataobj))


@pytest.mark.parametrize("prefetch", [True, False])
def test_a_failed_write_fails_its_case_alone_and_leaves_no_file(inputs, tmp_path, caplog, prefetch):
    folder, ckpt = inputs
    out = tmp_path / "out"
    (out / "b_good_seg.nii.gz").mkdir(parents=True)  # a folder where the label map should go: the rename fails
    code, lines = run_logged(engine(folder, ckpt, out, ThresholdNet(), prefetch), caplog)
    assert code == 1
    cases = [line for line in lines if line.startswith("[")]
    assert [c.split()[1] for c in cases] == ["segmented", "failed:", "failed:", "segmented"]
    assert "b_good.nii.gz" in cases[1] and "c_corrupt.nii.gz" in cases[2]
    summary = json.loads((out / "inference_summary.json").read_text())
    assert len(summary["done"]) == 2 and len(summary["failed"]) == 2
    assert (out / "a_good_seg.nii.gz").is_file() and (out / "d_good_seg.nii.gz").is_file()
    assert not list(out.glob(f"{PARTIAL_PREFIX}*"))


@pytest.mark.parametrize("prefetch", [True, None])
def test_cases_are_read_in_a_background_thread_while_the_previous_one_is_inferred(inputs, tmp_path, caplog, prefetch):
    """With prefetch the next case is read during an inference; by default on a CPU only after the case is written."""
    folder, ckpt = inputs
    out = tmp_path / "out"
    timeline, third_read = Timeline(), threading.Event()
    net = RecordingNet(timeline, hold=third_read if prefetch else None)  # one call per case (32 slices a batch)
    eng = engine(folder, ckpt, out, net, prefetch)
    threads, second_written = set(), {}
    preprocess = eng.dataset.transform

    def recorded(data):
        name = data["image"].split("/")[-1]
        threads.add(threading.current_thread().name)
        second_written[name] = (out / "b_good_seg.nii.gz").is_file()
        timeline(f"read {name}")
        if name == "c_corrupt.nii.gz":
            third_read.set()
        return preprocess(data)

    eng.dataset.transform = recorded
    run_logged(eng, caplog)
    assert net.calls == 3 and threads and all(t.startswith("msa2net-read") for t in threads)
    assert timeline.before("infer 1 end", "read b_good.nii.gz")  # the first inference runs alone
    if prefetch:
        # case 3's read began while case 2 was inferred: the inference waited for it and did not time out
        assert net.held is True and timeline.before("read c_corrupt.nii.gz", "infer 2 end")
        assert not second_written["c_corrupt.nii.gz"]
    else:
        assert timeline.before("infer 2 end", "read c_corrupt.nii.gz") and second_written["c_corrupt.nii.gz"]


def test_unreadable_checkpoint_stops_before_any_case_with_exit_2(inputs, tmp_path, caplog):
    folder, _ = inputs
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    code, lines = run_logged(engine(folder, bad, tmp_path / "out", ThresholdNet()), caplog)
    assert code == 2
    assert [line for line in lines if line.startswith("error:")] and not [line for line in lines if line.startswith("[")]
    assert not (tmp_path / "out").exists()
