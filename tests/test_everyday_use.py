"""A new user's first steps: run folders, refusing a stale resume state, mismatch messages, label files, feedback."""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events

from conftest import BUNDLE, ROOT
from msa2net.handlers import EpochProgressBar
from msa2net.inference import list_inputs, load_weights
from msa2net.networks import create_msa2net

#: The README's training command with the synthetic profile, as small as it gets.
README_TRAINING = [
    "-m", "monai.bundle", "run", "training", "--config_file",
    f"['{BUNDLE}/configs/train.json','{BUNDLE}/configs/profile_synthetic.json']",
    "--dataset_dir", "data", "--output_dir", "runs/first", "--spatial_size", "[64,64]", "--max_epochs", "1",
    "--val_interval", "1", "--batch_size", "4", "--slices_per_volume", "2",
]


def _train(cwd, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "custom"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, *README_TRAINING, *extra], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def first_run(volume_dataset, tmp_path_factory):
    """The README's training command from a folder of the user's, with data given relative to it."""
    cwd = tmp_path_factory.mktemp("user")
    (cwd / "data").symlink_to(volume_dataset)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (BUNDLE / "models").iterdir() if p.is_file()}
    proc = _train(cwd)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (BUNDLE / "models").iterdir() if p.is_file()}
    return cwd, proc, before, after


def test_training_leaves_the_shipped_models_byte_identical(first_run):
    _, _, before, after = first_run
    assert after == before


def test_training_writes_everything_into_its_run_folder(first_run):
    cwd, _, _, _ = first_run
    run = cwd / "runs" / "first"
    assert sorted(p.name for p in cwd.iterdir()) == ["data", "runs"]
    for part in ("models/model.pt", "models/resume.pt", "train.log", "training_log.csv"):
        assert (run / part).is_file(), part
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    row = next(csv.DictReader(open(run / "training_log.csv")))
    assert {"val_organ_1", "val_organ_2"} <= set(row) and float(row["loss"]) > 0


def test_one_line_per_epoch_with_loss_per_class_dice_and_time(first_run):
    cwd, proc, _, _ = first_run
    lines = [line for line in proc.stdout.splitlines() if "epoch 1/1:" in line]
    assert len(lines) == 1, proc.stdout[-3000:]
    assert re.search(r"loss \d\.\d{4}, validation Dice \d\.\d{4} \(organ_1 \d\.\d{4}, organ_2 \d\.\d{4}; best", lines[0])
    assert re.search(r", \d+\.\d s \(total \d+ s\)$", lines[0])
    assert "tensor(" not in proc.stdout + proc.stderr
    assert lines[0].split(" - ")[-1] in (cwd / "runs" / "first" / "train.log").read_text()


def test_no_warning_about_data_loading_workers(first_run):
    _, proc, _, _ = first_run
    assert "worker" not in (proc.stdout + proc.stderr).lower()


def test_a_stale_resume_state_of_another_run_is_refused_in_one_line(first_run):
    cwd, _, _, _ = first_run
    proc = _train(cwd, "--class_names", "['a','b','c']")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1
    assert "Traceback" not in output and "size mismatch" not in output
    lines = [line for line in output.splitlines() if "not resumed" in line]
    assert len(lines) == 1
    assert "class_names ['organ_1', 'organ_2'] saved vs ['a', 'b', 'c'] now" in lines[0] and "--output_dir" in lines[0]


def test_a_network_change_outside_the_run_settings_is_refused_in_one_line(first_run):
    cwd, _, _, _ = first_run
    proc = _train(cwd, "--network_def#use_bridge", "False")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in output
    assert "not resumed" in output and "parameters missing" in output


def test_the_same_command_resumes_and_says_so(first_run):
    cwd, _, _, _ = first_run
    proc = _train(cwd, "--max_epochs", "2")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "resumed from runs/first/models/resume.pt after epoch 1" in proc.stdout


@pytest.mark.parametrize(
    "preset, channels, classes, expected",
    [
        ("tiny", 1, 9, "classes: 2 in the weights vs 8 in the config (class_names)"),
        ("tiny", 3, 3, "input channels: 1 in the weights vs 3 in the config (in_channels)"),
        ("small", 1, 3, "preset: 'tiny' in the weights vs 'small' in the config (model_preset)"),
    ],
)
def test_weight_mismatch_names_what_differs_in_one_line(tmp_path, preset, channels, classes, expected):
    torch.save({"model": create_msa2net("tiny", in_channels=1, num_classes=3).state_dict()}, tmp_path / "model.pt")
    with pytest.raises(ValueError) as e:
        load_weights(create_msa2net(preset, in_channels=channels, num_classes=classes), tmp_path / "model.pt")
    message = str(e.value)
    assert expected in message and "\n" not in message and "size mismatch" not in message


def test_label_files_are_skipped_and_named(tmp_path, caplog):
    for name in ("a.nii.gz", "a_label.nii.gz", "b_seg.nii.gz", "c_gt.nii.gz", "Mask_d.nii.gz", "e_labels.nii.gz"):
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.float32), np.eye(4)), tmp_path / name)
    with caplog.at_level(logging.INFO, logger="msa2net.inference"):
        assert [os.path.basename(d["image"]) for d in list_inputs(tmp_path)] == ["a.nii.gz"]
    skipped = [r.getMessage() for r in caplog.records if "skipped 5 input(s)" in r.getMessage()]
    assert len(skipped) == 1 and all(n in skipped[0] for n in ("a_label.nii.gz", "Mask_d.nii.gz", "c_gt.nii.gz"))
    assert len(list_inputs(tmp_path, exclude=[])) == 6
    assert [os.path.basename(d["image"]) for d in list_inputs(tmp_path, ["*_gt*"], exclude=[])] == ["c_gt.nii.gz"]
    with pytest.raises(FileNotFoundError, match=r"no input images .* \(6 skipped by exclude_pattern\)"):
        list_inputs(tmp_path, exclude=["*"])


def _trainer_with_loss() -> Engine:
    def step(engine, batch):
        return {"loss": torch.tensor(float(batch))}

    return Engine(step)


def test_progress_bar_keeps_a_running_loss_on_a_terminal_only():
    trainer = _trainer_with_loss()
    EpochProgressBar(alpha=0.5, terminal=True).attach(trainer)
    trainer.run([1.0, 3.0], max_epochs=1)
    assert trainer.state.metrics["running_loss"] == pytest.approx(2.0)
    quiet = _trainer_with_loss()
    EpochProgressBar(terminal=False).attach(quiet)  # a log file: no per-iteration read-back of the loss
    assert not quiet._event_handlers[Events.ITERATION_COMPLETED]
    quiet.run([1.0, 3.0], max_epochs=1)
    assert "running_loss" not in quiet.state.metrics


def test_mlflow_override_adds_monais_handler_to_trainer_and_validator():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / "train.json"), str(BUNDLE / "configs" / "mlflow.json")])
    train, val = parser["train"]["handlers"], parser["validate"]["handlers"]
    assert train[-1]["_target_"] == val[-1]["_target_"] == "MLFlowHandler"
    assert [h["_target_"] for h in train[:-1]] == [h["_target_"] for h in ConfigParser.load_config_file(str(BUNDLE / "configs" / "train.json"))["train"]["handlers"]]


def test_num_workers_default_to_the_cores_this_process_may_use():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    assert parser.get_parsed_content("num_workers") == min(4, len(os.sched_getaffinity(0)))


def test_publish_refuses_weights_that_do_not_fit_and_leaves_the_bundle_alone(tmp_path):
    from msa2net.publish import publish

    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE / "configs", bundle / "configs")
    shutil.copytree(BUNDLE / "models", bundle / "models")
    before = (bundle / "models" / "model.pt").read_bytes()
    run = tmp_path / "run"
    (run / "models").mkdir(parents=True)
    torch.save({"model": create_msa2net("tiny", in_channels=1, num_classes=3).state_dict()}, run / "models" / "model.pt")
    with pytest.raises(SystemExit) as e:
        publish(run, bundle_dir=bundle)
    assert str(e.value).startswith("error: not published: ") and "preset: 'tiny' in the weights vs 'paper'" in str(e.value)
    assert (bundle / "models" / "model.pt").read_bytes() == before
    assert "published" in publish(run, bundle_dir=bundle, model_preset="tiny", class_names=["a", "b"])
    assert torch.load(bundle / "models" / "model.pt", weights_only=True)["model"].keys() == create_msa2net("tiny", num_classes=3).state_dict().keys()
    # the Kvasir-SEG profile's weights go to its own file; the ACDC file stays as it was
    acdc_before = (bundle / "models" / "model.pt").read_bytes()
    kvasir = tmp_path / "kvasir_run" / "models"
    kvasir.mkdir(parents=True)
    torch.save({"model": create_msa2net("base", in_channels=3, num_classes=2).state_dict()}, kvasir / "model.pt")
    assert "model_kvasir.pt" in publish(kvasir.parent, profile="profile_kvasir.json", bundle_dir=bundle, half=True)
    assert (bundle / "models" / "model.pt").read_bytes() == acdc_before
    published = torch.load(bundle / "models" / "model_kvasir.pt", weights_only=True)["model"]
    assert published["encoder.stem.conv.weight"].shape[1] == 3 and published["encoder.stem.conv.weight"].dtype == torch.float16
    assert sorted(p.name for p in (bundle / "models").iterdir()) == sorted(p.name for p in (BUNDLE / "models").iterdir())
