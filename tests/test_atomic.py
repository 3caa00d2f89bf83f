"""The one write-to-temp-then-rename helper: complete or absent, never half-written."""

from __future__ import annotations

import pytest
import torch

from msa2net.atomic import atomic_path, atomic_torch_save, atomic_write_bytes, atomic_write_text


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "summary.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["summary.json"]


def test_temporary_name_keeps_the_extension_and_writes_land(tmp_path):
    target = tmp_path / "case_seg.nii.gz"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".nii.gz") and tmp.name.startswith(".partial-")
        tmp.write_bytes(b"x")
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    atomic_torch_save({"w": torch.ones(2)}, tmp_path / "m.pt")
    assert target.read_bytes() == b"x" and (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert torch.equal(torch.load(tmp_path / "m.pt", weights_only=True)["w"], torch.ones(2))


def test_folders_are_replaced_whole_or_not_at_all(tmp_path):
    out = tmp_path / "bundle"
    with atomic_path(out, replace_dir=True) as tmp:
        tmp.mkdir()
        (tmp / "a.txt").write_text("1")
    with pytest.raises(ValueError):
        with atomic_path(out, replace_dir=True) as tmp:
            tmp.mkdir()
            (tmp / "b.txt").write_text("2")
            raise ValueError("copy failed")
    assert [p.name for p in out.iterdir()] == ["a.txt"]
    with atomic_path(out, replace_dir=True) as tmp:
        tmp.mkdir()
        (tmp / "c.txt").write_text("3")
    assert [p.name for p in out.iterdir()] == ["c.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_leftovers_of_a_killed_writer_are_removed_and_nothing_else(tmp_path):
    from msa2net.atomic import remove_partials

    (tmp_path / "resume.pt").write_bytes(b"complete")
    (tmp_path / ".partial-1a2b3c4d-resume.pt").write_bytes(b"half")
    (tmp_path / ".partial-5e6f7a8b-export").mkdir()
    (tmp_path / ".partial-5e6f7a8b-export" / "x").write_text("half")
    assert remove_partials(tmp_path) == [".partial-1a2b3c4d-resume.pt", ".partial-5e6f7a8b-export"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resume.pt"]
    assert remove_partials(tmp_path / "absent") == []
