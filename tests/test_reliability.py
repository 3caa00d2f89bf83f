"""Bad input, faults and hostile files: one clear line per problem, no partial output, the batch goes on."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import itk
import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import BUNDLE, SYNTHETIC, bundle_cmd, needs_shared_data, shared_data
from msa2net.data.datalist import DatalistError, load_datalist
from ignite.engine import Engine, Events
from msa2net.handlers import BestMetricState, ResumeCheckpoint, atomic_torch_save
from msa2net.dicom import check_dicom_series
from msa2net.inference import load_weights
from msa2net.transforms import InputError
from msa2net.networks import create_msa2net


def write_dicom_series(
    arr_zyx: np.ndarray, folder, spacing=(0.8, 0.9, 2.5), origin=(10.0, -20.0, 30.0), skip=(), uid="1.2.826.0.1.3680043.8.498.1",
    shift: dict | None = None, tilt_mm: float = 0.0,
):
    """One DICOM CT file per slice with its own position, all in one series (ITK/GDCM writer).

    ``shift`` moves slice ``k`` by ``shift[k]`` mm along the normal; ``tilt_mm`` moves each slice that far in y per slice.
    """
    os.makedirs(folder, exist_ok=True)
    for k in range(arr_zyx.shape[0]):
        if k in skip:
            continue
        img = itk.image_from_array(np.ascontiguousarray(arr_zyx[k : k + 1]))
        img.SetSpacing(list(spacing))
        z = origin[2] + k * spacing[2] + (shift or {}).get(k, 0.0)
        img.SetOrigin([origin[0], origin[1] + k * tilt_mm, z])
        io = itk.GDCMImageIO.New()
        io.KeepOriginalUIDOn()
        meta = img.GetMetaDataDictionary()
        tags = {"0020|000e": uid, "0020|000d": uid + ".0", "0008|0060": "CT", "0020|0013": str(k + 1), "0008|0018": f"{uid}.{k + 1}"}
        for tag, value in tags.items():
            meta[tag] = value
        itk.imwrite(img, os.path.join(folder, f"slice{k:03d}.dcm"), imageio=io)


@pytest.fixture(scope="module")
def corpus(volume_dataset, tmp_path_factory):
    """Good and bad inputs side by side in one folder whose name has spaces and non-ASCII letters."""
    folder = tmp_path_factory.mktemp("inputs") / "bad inputs ü"
    folder.mkdir()
    good = nib.load(volume_dataset / "imagesTr" / "case_000.nii.gz")
    data = np.asarray(good.dataobj, dtype=np.float32)
    raw = (volume_dataset / "imagesTr" / "case_000.nii.gz").read_bytes()
    (folder / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    (folder / "zero_bytes.nii.gz").write_bytes(b"")
    (folder / "not_an_image.nii.gz").write_bytes(b"this is a text file, not NIfTI\n" * 20)
    nan = data.copy()
    nan[5, 5, 5], nan[6, 6, 6] = np.nan, np.inf
    nib.save(nib.Nifti1Image(nan, good.affine), folder / "nan_inf.nii.gz")
    nib.save(nib.Nifti1Image(np.stack([data, data], -1), good.affine), folder / "four_d.nii.gz")
    nib.save(nib.Nifti1Image(data[..., 3], good.affine), folder / "two_d.nii.gz")
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 5e4, 1.0])), folder / "extreme_spacing.nii.gz")
    singular = good.affine.copy()
    singular[:3, 2] = 0
    bad_geom = nib.Nifti1Image(data, None)
    bad_geom.header.set_sform(singular, code=1)
    bad_geom.header.set_qform(None, code=0)
    bad_geom.to_filename(folder / "singular_affine.nii.gz")
    series = np.random.default_rng(0).integers(0, 800, (6, 40, 48)).astype(np.int16)
    write_dicom_series(series, folder / "dicom_missing_slice", skip=(2,))
    # inputs that must work
    nib.save(nib.Nifti1Image(np.full_like(data, 7.0), good.affine), folder / "constant.nii.gz")
    nib.save(nib.Nifti1Image(data[:20, :12, :2], good.affine), folder / "smaller_than_network.nii.gz")
    shutil.copy(volume_dataset / "imagesTr" / "case_000.nii.gz", folder / "ünïcode and spaces.nii.gz")
    write_dicom_series(series, folder / "dicom_complete")
    return folder


BAD = {
    "truncated.nii.gz": "Compressed file ended",
    "zero_bytes.nii.gz": "Empty file",
    "not_an_image.nii.gz": "not a gzip file",
    "nan_inf.nii.gz": "2 voxel(s) are NaN or infinite",
    "four_d.nii.gz": "expected 1 channel(s), got 2",
    "two_d.nii.gz": "expected a volume, got a 2D image",
    "extreme_spacing.nii.gz": "implausible voxel spacing",
    "singular_affine.nii.gz": "singular",
    "dicom_missing_slice": "a slice is missing",
}
GOOD = ["constant", "smaller_than_network", "ünïcode and spaces", "dicom_complete"]


@pytest.fixture(scope="module")
def corpus_run(corpus, trained_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus_out")
    proc = bundle_cmd(
        "inference", ["inference.json"], "--dataset_dir", str(corpus), "--output_dir", str(out),
        "--ckpt_path", str(trained_tiny / "models" / "model.pt"), *SYNTHETIC, check=False,
    )
    return proc, out


def test_batch_exits_nonzero_and_summary_lists_every_failure(corpus_run, corpus):
    proc, out = corpus_run
    assert proc.returncode == 1
    summary = json.loads((out / "inference_summary.json").read_text())
    assert sorted(os.path.basename(f["image"]) for f in summary["failed"]) == sorted(BAD)
    assert len(summary["done"]) == len(GOOD)


@pytest.mark.parametrize("name", sorted(BAD))
def test_each_bad_input_gets_one_clear_line(corpus_run, corpus, name):
    proc, _ = corpus_run
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "failed:" in line and name in line]
    assert len(lines) == 1, lines
    assert f"{corpus / name}: " in lines[0] and BAD[name] in lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]


def test_no_partial_output_for_failed_cases(corpus_run):
    _, out = corpus_run
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted([f"{g}_seg.nii.gz" for g in GOOD] + ["inference_summary.json"])


def test_good_cases_in_a_bad_batch_keep_their_geometry(corpus_run, corpus):
    _, out = corpus_run
    for name in ("constant", "smaller_than_network", "ünïcode and spaces"):
        image, seg = nib.load(corpus / f"{name}.nii.gz"), nib.load(out / f"{name}_seg.nii.gz")
        assert seg.shape == image.shape
        np.testing.assert_allclose(seg.affine, image.affine, atol=1e-5)
    seg = nib.load(out / "dicom_complete_seg.nii.gz")
    assert seg.shape == (48, 40, 6)
    np.testing.assert_allclose(np.abs(np.diag(seg.affine)[:3]), [0.8, 0.9, 2.5], atol=1e-5)


@needs_shared_data("ct", "dicom_series_20")
def test_real_dicom_series_with_a_missing_slice_is_refused(trained_tiny, tmp_path):
    series = shared_data("ct", "dicom_series_20")
    broken = tmp_path / "inputs" / "ct_missing_slice"
    shutil.copytree(series, broken)
    sorted(broken.iterdir())[10].unlink()
    proc = bundle_cmd(
        "inference", ["inference.json"], "--dataset_dir", str(tmp_path / "inputs"), "--output_dir", str(tmp_path / "out"),
        "--ckpt_path", str(trained_tiny / "models" / "model.pt"), *SYNTHETIC, check=False,
    )
    assert proc.returncode == 1 and "a slice is missing" in proc.stdout + proc.stderr
    assert not (tmp_path / "out" / "ct_missing_slice_seg.nii.gz").exists()


def test_missing_input_folder_and_checkpoint_are_one_line_errors(trained_tiny, tmp_path):
    proc = bundle_cmd(
        "inference", ["inference.json"], "--dataset_dir", str(tmp_path / "absent"), "--output_dir", str(tmp_path / "o"),
        "--ckpt_path", str(trained_tiny / "models" / "model.pt"), *SYNTHETIC, check=False,
    )
    assert proc.returncode == 2 and f"{tmp_path / 'absent'}: input folder or file not found" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]


def test_crafted_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "model.pt"
    torch.save({"model": Exploit()}, path)
    net = create_msa2net("tiny", num_classes=3)
    with pytest.raises(ValueError, match=r"model.pt: refused to load: the file holds Python objects beyond tensors"):
        load_weights(net, path)
    assert not marker.exists()


def test_truncated_checkpoint_is_a_clear_error(trained_tiny, tmp_path):
    raw = (trained_tiny / "models" / "model.pt").read_bytes()
    (tmp_path / "model.pt").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(ValueError, match="model.pt: not a readable PyTorch checkpoint"):
        load_weights(create_msa2net("tiny", num_classes=3), tmp_path / "model.pt")


def test_atomic_save_keeps_the_previous_checkpoint_on_failure(tmp_path):
    path = tmp_path / "resume.pt"
    atomic_torch_save({"epoch": 1}, path)
    # a local lambda cannot be pickled: AttributeError up to Python 3.13, PicklingError from 3.14
    with pytest.raises((AttributeError, pickle.PicklingError), match="[Cc]an't pickle"):
        atomic_torch_save({"epoch": 2, "bad": lambda: None}, path)
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["resume.pt"]


@pytest.mark.parametrize(
    "kwargs, problem",
    [
        ({"shift": {3: 0.05 * 2.5}}, "a slice is missing"),  # one gap 5 % off: refused, as by the Deploy app
        ({"tilt_mm": 0.5}, "drift"),
        ({"shift": {3: 0.005 * 2.5}}, None),  # 0.5 %: within the shared tolerance
    ],
)
def test_dicom_series_check_uses_the_deploy_apps_tolerance(tmp_path, kwargs, problem):
    series = np.random.default_rng(0).integers(0, 800, (6, 16, 16)).astype(np.int16)
    write_dicom_series(series, tmp_path / "s", **kwargs)
    if problem is None:
        check_dicom_series(tmp_path / "s")
    else:
        with pytest.raises(InputError, match=problem):
            check_dicom_series(tmp_path / "s")


def _saved_epochs(tmp_path, save_dict: dict, interval: int, before_save=None) -> list[int]:
    """Run a 7-epoch trainer with ResumeCheckpoint; the epochs after which it wrote the resume file."""
    trainer = Engine(lambda engine, batch: None)
    if before_save is not None:  # like train.json's validation handler, registered before the saver
        trainer.add_event_handler(Events.EPOCH_COMPLETED, before_save)
    ResumeCheckpoint(tmp_path / "resume.pt", save_dict, interval=interval).attach(trainer)
    saved_after = []

    @trainer.on(Events.EPOCH_COMPLETED)
    def record(engine):
        path = tmp_path / "resume.pt"
        if path.is_file():
            state = torch.load(path, weights_only=True)["trainer"]
            saved_after.append(state["iteration"] // state["epoch_length"])
            path.unlink()

    trainer.run([0, 1], max_epochs=7)
    return saved_after


def test_resume_checkpoint_saves_every_interval_and_at_the_end(tmp_path):
    net = torch.nn.Linear(2, 1)
    assert _saved_epochs(tmp_path, {"model": net}, interval=3) == [3, 6, 7]
    with pytest.raises(ValueError, match="interval"):
        ResumeCheckpoint(tmp_path / "r.pt", {"model": net}, interval=0)


def test_resume_checkpoint_saves_a_new_best_between_intervals(tmp_path):
    evaluator = Engine(lambda engine, batch: None)
    evaluator.state.best_metric, evaluator.state.best_metric_epoch = 0.5, -1

    def validate(engine):
        if engine.state.epoch == 4:
            evaluator.state.best_metric, evaluator.state.best_metric_epoch = 0.9, 4

    save_dict = {"model": torch.nn.Linear(2, 1), "best": BestMetricState(evaluator)}
    assert _saved_epochs(tmp_path, save_dict, interval=3, before_save=validate) == [3, 4, 6, 7]


def test_datalist_paths_cannot_escape_the_dataset_root(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (tmp_path / "secret.nii.gz").touch()  # existing files: the refusal is for where they lie
    (root / "l.nii.gz").touch()
    (root / "dataset.json").write_text(json.dumps({"training": [{"image": "../secret.nii.gz", "label": "l.nii.gz"}]}))
    with pytest.raises(DatalistError, match=r"dataset.json: image path .*secret.nii.gz lies outside the dataset root"):
        load_datalist(root / "dataset.json", "training")
    assert load_datalist(root / "dataset.json", "training", allow_outside_root=True)[0]["image"].endswith("secret.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"training": [{"image": "/etc/passwd", "label": "l.nii.gz"}]}))
    with pytest.raises(DatalistError, match="outside the dataset root"):
        load_datalist(root / "dataset.json", "training")


def _train_cmd(dataset, run_dir, epochs):
    config = "['configs/train.json','configs/profile_synthetic.json']"
    return [
        sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", config, "--dataset_dir", str(dataset),
        "--spatial_size", "[64,64]", "--max_epochs", str(epochs), "--val_interval", "1", "--slices_per_volume", "4",
        "--batch_size", "4", "--ckpt_dir", str(run_dir / "models"), "--output_dir", str(run_dir / "eval"),
    ]


def test_kill_9_mid_epoch_then_the_same_command_resumes(volume_dataset, tmp_path):
    cmd, epochs = _train_cmd(volume_dataset, tmp_path, 8), 8
    resume = tmp_path / "models" / "resume.pt"
    proc = subprocess.Popen(cmd, cwd=BUNDLE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if resume.is_file():
            state = torch.load(resume, weights_only=True)
            if state["trainer"]["iteration"] >= 2 * state["trainer"]["epoch_length"]:
                break
        time.sleep(0.2)
    assert proc.poll() is None, "training ended before it could be interrupted"
    time.sleep(0.5)  # inside the next epoch
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(resume, weights_only=True)["trainer"]
    done_epochs = killed_at["iteration"] // killed_at["epoch_length"]
    assert 2 <= done_epochs < epochs
    again = subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"after epoch {done_epochs}" in again.stdout + again.stderr
    final = torch.load(resume, weights_only=True)
    assert final["trainer"]["iteration"] == epochs * final["trainer"]["epoch_length"]
    log = (tmp_path / "eval" / "training_log.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in log] == list(range(1, epochs + 1))
    assert not list((tmp_path / "models").glob(".*")), "no temporary checkpoint file left"
    torch.load(tmp_path / "models" / "model.pt", weights_only=True)


def test_same_seed_same_metrics_on_cpu(volume_dataset, tmp_path):
    runs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        proc = subprocess.run(_train_cmd(volume_dataset, out, 2), cwd=BUNDLE, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = (out / "eval" / "training_log.csv").read_text().splitlines()[1:]
        runs.append([[float(v) for v in r.split(",")[:4]] for r in rows])  # epoch, loss, lr, metric (not elapsed_s)
    np.testing.assert_allclose(runs[0], runs[1], rtol=0, atol=1e-6)


def test_volume_given_to_the_2d_pipeline_is_refused(trained_tiny, volume_dataset, tmp_path):
    volume = volume_dataset / "imagesTr" / "case_001.nii.gz"
    proc = bundle_cmd(
        "inference", ["inference.json", "profile_kvasir.json"], "--dataset_dir", str(volume), "--model_preset", "tiny",
        "--in_channels", "1", "--class_names", "['organ_1','organ_2']", "--output_dir", str(tmp_path), "--ckpt_path", str(trained_tiny / "models" / "model.pt"),
        "--spatial_size", "[64,64]", check=False,
    )
    assert proc.returncode == 1
    assert f"{volume}: expected a 2D image, got a 3D image" in proc.stdout + proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inference_summary.json"]
