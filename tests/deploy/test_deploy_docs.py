"""The commands of ``deploy/README.md`` and ``bundle/docs/deploy.md`` run as written, with the shipped weights.

Paths are the only substitutions: ``.venv/bin/python`` and ``.venv-deploy/bin/python`` become this
interpreter, ``dist/models/msa2net`` a temporary folder, ``/path/to/...`` real folders.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

pytest.importorskip("monai.deploy.core", reason="MONAI Deploy App SDK not installed (see bundle/docs/deploy.md)")

import pydicom  # noqa: E402
from deploy_testdata import ROOT, Run, write_series  # noqa: E402

README = ROOT / "deploy" / "README.md"
GUIDE = ROOT / "bundle" / "docs" / "deploy.md"


def _commands(path) -> list[str]:
    """The indented command lines of a Markdown file."""
    return [line.strip() for line in path.read_text().splitlines() if re.match(r"^    (\.venv|python3)", line)]


def _as_run_here(command: str, tmp_path) -> list[str]:
    command = command.replace("dist/models/msa2net", str(tmp_path / "dist" / "models" / "msa2net"))
    command = command.replace("/path/to/dicom_folder", str(tmp_path / "dicom")).replace("/path/to/output", str(tmp_path / "output"))
    args = shlex.split(command)
    assert args[0] in (".venv/bin/python", ".venv-deploy/bin/python"), command
    return [sys.executable, *args[1:]]


def _readme_command(start: str) -> str:
    (command,) = [c for c in _commands(README) if start in c]
    return command


def test_readme_commands_are_the_guides():
    guide = _commands(GUIDE)
    assert all(command in guide for command in _commands(README)), "deploy/README.md and bundle/docs/deploy.md disagree"
    assert not any("profile_synapse.json" in c for c in _commands(README) + guide), "no Synapse weights are shipped"


def test_deploy_bundle_and_app_run_as_written_with_the_shipped_weights(tmp_path):
    """The shipped cardiac MR model: the documented export, then the documented run on an MR series."""
    export = subprocess.run(
        _as_run_here(_readme_command("deploy_bundle"), tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert export.returncode == 0, export.stderr[-3000:]
    write_series(tmp_path / "dicom", "MR", shape=(6, 64, 64))
    cmd = _as_run_here(_readme_command("deploy/app"), tmp_path)
    terminal, _ = Run(cmd, tmp_path / "terminal.txt", cwd=ROOT).check(timeout=600)
    assert terminal.startswith("msa2net deploy: wrote ") and len(terminal.strip().splitlines()) == 1
    (seg_file,) = (tmp_path / "output").glob("*.dcm")
    seg = pydicom.dcmread(seg_file)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["right_ventricle", "myocardium", "left_ventricle"]


def test_synapse_profile_with_the_shipped_weights_names_the_class_counts(tmp_path):
    command = _readme_command("deploy_bundle").replace("profile_acdc.json", "profile_synapse.json")
    proc = subprocess.run(_as_run_here(command, tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0
    assert "classes: 3 in the weights vs 8 in the config (class_names)" in proc.stdout + proc.stderr
    assert not (tmp_path / "dist" / "models" / "msa2net").exists()
