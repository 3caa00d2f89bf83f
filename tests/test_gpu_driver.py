"""scripts/gpu/detached.py on the CPU: a detached training, watched, brought back in parts, joined, and continued."""

import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from msa2net.data.synthetic import make_volume_dataset

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "scripts" / "gpu" / "detached.py"
sys.path.insert(0, str(DRIVER.parent))
from detached import alive  # noqa: E402


def driver(*args, timeout=600):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": f"{ROOT / 'custom'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, str(DRIVER), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def wait_for_end(work: Path, timeout: float = 300) -> None:
    """Wait for the detached runs under ``work`` to end, checking twice a second (``watch`` checks every 10 s)."""
    pids = [json.loads(job.read_text())["pid"] for job in work.glob("*/job.json")]
    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.5)


@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("detached")
    make_volume_dataset(str(tmp / "data"), num_cases=4, num_validation=1, shape=(32, 32, 6), seed=3)
    common = ["--work", str(tmp / "work"), "--dataset_dir", str(tmp / "data"), "--profile", "synthetic", "--threads", "1"]
    bundle_args = ["--", "--spatial_size", "[32,32]", "--val_interval", "1", "--batch_size", "4", "--cuda_graphs", "False"]
    driver("start", "--name", "first", "--budget_s", "12", *common, *bundle_args)
    out = tmp / "out1"
    wait_for_end(tmp / "work")
    driver("watch", "--work", str(tmp / "work"), "--out", str(out), "--wait_s", "300", "--evaluate", "--weights", "first:latest")
    return tmp, common, bundle_args, out


def test_watch_reports_the_run_and_its_evaluations(watched):
    _, _, _, out = watched
    status = json.loads((out / "status.json").read_text())["runs"]["first"]
    assert not status["alive"] and status["epochs_done"] >= 2
    assert status["evaluations"]["best"]["num_cases"] == 1 and status["evaluations"]["final"]["num_cases"] == 1
    with tarfile.open(out / "logs.tar.gz") as logs:
        train_log = logs.extractfile("first/train.log").read().decode()
    # the budget ended the run (not the profile's max_epochs), after the last epoch it counted
    ended = re.findall(r"time budget of 12 s used after epoch (\d+): training ends", train_log)
    assert ended == [str(status["epochs_done"])], train_log[-3000:]


def test_parts_join_to_the_recorded_weights_and_a_fresh_run_continues_from_them(watched, tmp_path):
    tmp, common, bundle_args, out = watched
    package = json.loads((out / "status.json").read_text())["runs"]["first"]["packages"]["latest"]
    assert package["parts"] == len(list(out.glob(f"{package['stem']}.part*"))) >= 1
    joined = tmp_path / "model.pt"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu" / "join_weights.py"), str(out), "--stem", package["stem"], "--preset", "tiny",
         "--num_classes", "3", "--dest", str(joined)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "custom")}, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["sha256"] == package["sha256"] and joined.is_file()
    # warm restart on a "fresh host": a new work folder, weights from the parts only
    driver("start", "--name", "second", "--budget_s", "5", "--init_parts", str(out), "--init_stem", package["stem"],
           *[a if a != str(tmp / "work") else str(tmp / "work2") for a in common], *bundle_args)
    wait_for_end(tmp / "work2")
    driver("watch", "--work", str(tmp / "work2"), "--out", str(tmp / "out2"), "--wait_s", "300", "--evaluate")
    second = json.loads((tmp / "out2" / "status.json").read_text())["runs"]["second"]
    assert "--init_ckpt" in second["overrides"] and second["epochs_done"] >= 1
    assert second["evaluations"]["final"]["num_cases"] == 1  # evaluated without the training-only --init_ckpt
    assert "Traceback" not in "\n".join(second["log_tail"])
