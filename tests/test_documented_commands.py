"""Every command of the README and the model card, run as written (with cheap settings appended) or skipped for a stated reason."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import BUNDLE, ROOT, SHARED_DATA, needs_shared_data

DOCS = [ROOT / "README.md", BUNDLE / "docs" / "README.md"]

#: Commands not run here, by what they start with or contain, and why.
SKIPPED = {
    "python3 -m venv": "creates an environment and installs packages",
    "pytest": "the test suite itself",
    ".venv-label/": "MONAI Label's own environment (its tests are tests/label)",
    ".venv-deploy/": "MONAI Deploy's own environment (its tests are tests/deploy)",
    "torchrun": "several GPUs",
    "gpu_train.json": "needs a CUDA GPU",
    "msa2net.data.prepare": "needs the raw public data sets (tests/test_prepare.py covers the layouts)",
    "msa2net.export deploy_bundle": "MONAI Deploy's guide (tests/deploy)",
    "runs/kvasir": "needs a Kvasir-SEG training run (the RGB path is test_bundle.test_2d_rgb_profile_trains_and_segments_png)",
    "tensorboard --logdir": "starts a web server",
    "export-bundle": "covered by test_bundle.test_exported_bundle_runs_with_its_own_copy_of_the_code",
    "msa2net.export torchscript": "covered by tests/test_export.py (the same code on the tiny preset)",
    "msa2net.export onnx": "covered by tests/test_export.py (the same code on the tiny preset)",
    "RUN_DIR": "names the argument; run above with a real run folder",
}

#: Appended to training so that it takes seconds: the tiny preset, one epoch of one step.
CHEAP_TRAINING = {"max_epochs": "1", "val_interval": "1", "batch_size": "4", "slices_per_volume": "2", "model_preset": "tiny"}


def documented_commands() -> list[str]:
    """Shell commands in fenced ``bash`` blocks and in inline code that starts a program of this project."""
    commands = []
    for doc in DOCS:
        text = doc.read_text()
        for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split("  #")[0].strip()
                if line and not line.startswith("#"):
                    commands.append(line)
        for inline in re.findall(r"`((?:python|msa2net|torchrun|\$ )[^`]*)`", text):
            commands.append(inline.removeprefix("$ ").strip())
    return [c for c in dict.fromkeys(commands) if re.match(r"(\S*python3?|msa2net|torchrun|\.venv\S*|tensorboard) ", c)]


def _skip_reason(command: str) -> str | None:
    return next((why for key, why in SKIPPED.items() if key in command), None)


def _mini_acdc(root: Path) -> Path:
    """Two training and one validation volume of real ACDC, in the same dataset.json form."""
    acdc = SHARED_DATA / "acdc"
    full = json.loads((acdc / "dataset.json").read_text())
    small = {"training": full["training"][:2], "validation": full["validation"][:1]}
    for case in small["training"] + small["validation"]:
        for key in ("image", "label"):
            (root / case[key]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(acdc / case[key], root / case[key])
    (root / "dataset.json").write_text(json.dumps(small))
    return root


def _prepare(command: str, places: dict[str, str], cwd: Path) -> list[str]:
    """The command as argv, with this checkout's paths and the test data in place of the placeholders."""
    for placeholder, real in places.items():
        command = command.replace(placeholder, real)
    argv = [t.replace("bundle/", f"{BUNDLE}/") for t in shlex.split(command)]
    if argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    elif argv[0] == "msa2net":
        argv[:1] = [sys.executable, "-m", "msa2net.cli"]
    extra = {}
    if "run training" in command:
        extra = dict(CHEAP_TRAINING)
    elif "runs/" in command:  # uses the tiny run trained above
        extra = {"model_preset": "tiny"}
    if "publish" in command:
        shutil.copytree(BUNDLE, cwd / "bundle_copy", dirs_exist_ok=True)
        extra["bundle_dir"] = str(cwd / "bundle_copy")
    for key, value in extra.items():
        if f"--{key}" in argv:
            argv[argv.index(f"--{key}") + 1] = value
        else:
            argv += [f"--{key}", value]
    return argv


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_every_command_is_run_or_skipped_for_a_reason():
    commands = documented_commands()
    runnable = [c for c in commands if _skip_reason(c) is None]
    assert any("run training" in c for c in runnable) and any("ckpt_export" in c for c in runnable), commands
    assert any(c.startswith("msa2net publish") for c in runnable), commands


@needs_shared_data("acdc")
def test_documented_commands_run_as_written_from_another_folder(tmp_path):
    """In document order from a folder outside the checkout: train, evaluate, segment, publish, export."""
    cwd = tmp_path / "work"
    cwd.mkdir()
    acdc = _mini_acdc(tmp_path / "acdc")
    new_cases = tmp_path / "new_cases"
    new_cases.mkdir()
    case = json.loads((acdc / "dataset.json").read_text())["validation"][0]
    shutil.copy(acdc / case["image"], new_cases / "patient_a.nii.gz")
    shutil.copy(acdc / case["label"], new_cases / "patient_a_gt.nii.gz")
    # the model card's GPU run is stood in for by the README's run
    places = {"/data/acdc": str(acdc), "/data/new_cases": str(new_cases), "/data/seg": "seg", "runs/acdc_paper": "runs/acdc"}
    shipped = _digest(BUNDLE / "models")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "custom"), os.environ.get("PYTHONPATH", "")])}
    ran = []
    for command in documented_commands():
        if _skip_reason(command) is not None:
            continue
        argv = _prepare(command, places, cwd)
        proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{command}\n{output[-4000:]}"
        assert "Traceback" not in output, f"{command}\n{output[-4000:]}"
        ran.append(command)
    assert len(ran) >= 6, ran
    assert _digest(BUNDLE / "models") == shipped, "a documented command changed the shipped bundle/models"

    run = cwd / "runs" / "acdc"
    for part in ("models/model.pt", "models/resume.pt", "train.log", "training_log.csv"):
        assert (run / part).is_file(), part
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((run / "evaluation" / "metrics_summary.json").read_text())["num_cases"] == 1
    # the label file next to the image was skipped, the image segmented into the folder given, nothing else
    assert sorted(p.name for p in (cwd / "seg").iterdir()) == ["inference_summary.json", "patient_a_seg.nii.gz"]
    seg, image = nib.load(cwd / "seg" / "patient_a_seg.nii.gz"), nib.load(new_cases / "patient_a.nii.gz")
    assert seg.shape == image.shape and np.allclose(seg.affine, image.affine, atol=1e-5)
    # publish replaced the copy's weights with the run's, as float16
    published = torch.load(cwd / "bundle_copy" / "models" / "model.pt", weights_only=True)["model"]
    trained = torch.load(run / "models" / "model.pt", weights_only=True)["model"]
    assert published.keys() == trained.keys() and all(published[k].dtype == torch.float16 for k in published if trained[k].is_floating_point())
    # MONAI's ckpt_export wrote a TorchScript module that computes what the shipped weights compute
    from monai.bundle import ConfigParser

    from msa2net.networks import create_msa2net

    shipped = ConfigParser()
    shipped.read_config(str(BUNDLE / "configs" / "inference.json"))
    net = create_msa2net(shipped.get("model_preset"), in_channels=1, num_classes=4).eval()
    net.load_state_dict(torch.load(BUNDLE / "models" / "model.pt", weights_only=True)["model"])
    x = torch.rand(1, 1, 224, 224)
    with torch.no_grad():
        np.testing.assert_allclose(torch.jit.load(cwd / "model.ts")(x), net(x), rtol=1e-5, atol=1e-4)  # trained logits reach the tens
