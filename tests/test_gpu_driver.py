"""scripts/gpu/detached.py on the CPU: a detached training, watched, brought back in parts, joined, and continued."""

import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from msa2net.data.synthetic import make_volume_dataset

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "scripts" / "gpu" / "detached.py"
sys.path.insert(0, str(DRIVER.parent))
from detached import WHICH, alive, join_parts, send_weights  # noqa: E402


def driver(*args, timeout=600):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": f"{ROOT / 'custom'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, str(DRIVER), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def join_weights(parts_dir: Path, stem: str, dest: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu" / "join_weights.py"), str(parts_dir), "--stem", stem, "--preset", "tiny",
         "--num_classes", "3", "--dest", str(dest), *extra],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "custom")}, capture_output=True, text=True,
    )


def packages(out: Path) -> dict:
    return json.loads((out / "status.json").read_text())["runs"]["first"]["packages"]


def parts_sha256(out: Path, stem: str) -> str:
    return hashlib.sha256(join_parts(out, stem)).hexdigest()


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
    proc = join_weights(out, package["stem"], joined)
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


def test_a_second_watch_does_not_send_unchanged_weights_again(watched, tmp_path):
    tmp, _, _, out = watched
    again = tmp_path / "out"
    printed = driver("watch", "--work", str(tmp / "work"), "--out", str(again), "--wait_s", "0", "--weights", "first:latest")
    sent, unchanged = packages(out)["latest"], packages(again)["latest"]
    assert sent["state"] == "written" and unchanged["state"] == "unchanged"
    assert unchanged["sha256"] == sent["sha256"] == parts_sha256(out, sent["stem"]) and unchanged["stem"] == sent["stem"]
    assert unchanged["sent_at"] == json.loads((out / "status.json").read_text())["time"]
    assert sorted(p.name for p in again.iterdir()) == ["logs.tar.gz", "status.json"]
    assert f"first:latest: unchanged since the watch of {unchanged['sent_at']}" in printed
    # the earlier call's parts, checked against this call's record
    proc = join_weights(out, sent["stem"], tmp_path / "model.pt", "--record", str(again))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["sha256_matches_device"]


def test_weights_that_do_not_fit_come_back_with_the_next_watch(watched, tmp_path):
    tmp, _, _, out = watched
    # room for one package of this network, not for two
    max_mb = 1.5 * packages(out)["latest"]["bytes"] / 1e6
    args = ["--work", str(tmp / "work"), "--wait_s", "0", "--max_mb", str(max_mb), "--weights", "first:best", "--weights", "first:final"]
    printed = [driver("watch", *args, "--out", str(tmp_path / f"w{i}")) for i in (1, 2)]
    first, second = packages(tmp_path / "w1"), packages(tmp_path / "w2")
    sizes = [first["best"]["bytes"], second["final"]["bytes"]]
    assert max(sizes) <= max_mb * 1e6 < sum(sizes)
    assert first["best"]["state"] == "written" and first["final"]["state"] == "deferred" and "sha256" not in first["final"]
    assert first["final"]["bytes"] == second["final"]["bytes"] and first["final"]["last_sent_at"] is None
    # the next watch tries the package never sent first, and the one just sent is unchanged
    assert second["final"]["state"] == "written" and second["best"]["state"] == "unchanged"
    assert list(second) == ["final", "best"]
    assert parts_sha256(tmp_path / "w1", "first_best_fp16.pt") == first["best"]["sha256"] == second["best"]["sha256"]
    assert parts_sha256(tmp_path / "w2", "first_final_fp16.pt") == second["final"]["sha256"]
    assert not list((tmp_path / "w1").glob("first_final*")) and not list((tmp_path / "w2").glob("first_best*"))
    assert "first:final: deferred" in printed[0] and "first:best: written" in printed[0]
    assert "first:final: written" in printed[1] and "first:best: unchanged" in printed[1]
    host_record = json.loads((tmp / "work" / "first" / "sent.json").read_text())
    assert host_record["best"]["sha256"] == first["best"]["sha256"] and host_record["final"]["sha256"] == second["final"]["sha256"]


def test_the_file_limit_rotates_packages_and_changed_weights_are_sent_again(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "a" / "models").mkdir(parents=True)
    (work / "a" / "job.json").write_text("{}")
    out.mkdir()

    def save(which: str, value: float) -> None:
        torch.save({"model": {"w": torch.full((4, 4), value)}}, work / "a" / "models" / WHICH[which])

    save("best", 1.0)
    save("final", 2.0)
    wanted = [("a", "best"), ("a", "final")]
    states = []
    for i, changed in enumerate((False, True, False)):
        if changed:  # new best weights after the first watch: the package never sent still goes first
            save("best", 3.0)
        records = send_weights(work, wanted, out, max_bytes=1e9, max_parts=1, now=f"2026-01-01T00:00:0{i}")
        states.append([(which, r["state"]) for (_, which), r in records.items()])
    assert states == [
        [("best", "written"), ("final", "deferred")],
        [("final", "written"), ("best", "deferred")],
        [("best", "written"), ("final", "unchanged")],  # sent longest ago, with new weights
    ]
    assert records["a", "final"]["sent_at"] == "2026-01-01T00:00:01"
    best = torch.load(out / "a_best_fp16.pt.part0", weights_only=True)["model"]["w"]
    assert best.dtype == torch.float16 and torch.equal(best, torch.full((4, 4), 3.0, dtype=torch.float16))
