"""Property tests: for random affines and sizes the label map keeps the input's exact grid, and an object is
found where it is in physical space (the network is replaced by one that thresholds its input)."""

from __future__ import annotations

import numpy as np
import nibabel as nib
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from monai.bundle import ConfigParser

from conftest import BUNDLE
from msa2net.inference import run_inference


class ThresholdNet(torch.nn.Module):
    """Two-class 'network' whose foreground logit is the intensity above 0.5: segmentation = thresholded input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fg = (x[:, :1] - 0.5) * 20
        return torch.cat([-fg, fg], dim=1)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    out = tmp_path_factory.mktemp("prop_out")
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    parser.update({"bundle_root": str(BUNDLE), "class_names": ["object"], "spatial_size": [64, 64], "output_dir": str(out), "device": "$torch.device('cpu')"})
    ckpt = out / "threshold.pt"
    torch.save({"model": {}}, ckpt)
    parts = {k: parser.get_parsed_content(k) for k in ("preprocessing", "inferer", "postprocessing", "image_pattern")}
    return parts, ckpt, out


def rotation(angles) -> np.ndarray:
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


@st.composite
def volumes(draw):
    shape = (draw(st.integers(8, 70)), draw(st.integers(8, 70)), draw(st.integers(2, 10)))
    spacing = np.array([draw(st.floats(0.3, 5.0)) for _ in range(3)])
    perm = draw(st.permutations([0, 1, 2]))
    signs = np.array([draw(st.sampled_from([-1.0, 1.0])) for _ in range(3)])
    oblique = draw(st.booleans())
    angles = [draw(st.floats(-np.pi, np.pi)) for _ in range(3)] if oblique else [0.0, 0.0, 0.0]
    linear = rotation(angles) @ (np.eye(3)[list(perm)] * signs) @ np.diag(spacing)
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = [draw(st.floats(-300, 300)) for _ in range(3)]
    lo = [draw(st.integers(0, s - 6)) for s in shape[:2]] + [draw(st.integers(0, shape[2] - 1))]
    size = [draw(st.integers(6, s - l)) for s, l in zip(shape[:2], lo[:2])] + [draw(st.integers(1, shape[2] - lo[2]))]
    return shape, affine, lo, size


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=volumes())
def test_label_map_keeps_grid_and_finds_the_object_in_physical_space(pipeline, case, tmp_path_factory):
    (parts, ckpt, out) = pipeline
    shape, affine, lo, size = case
    data = np.zeros(shape, dtype=np.float32)
    box = tuple(slice(l, min(l + s, n)) for l, s, n in zip(lo, size, shape))
    data[box] = 100.0
    folder = tmp_path_factory.mktemp("prop_in")
    name = folder.name  # unique per example; the bundle writes every label map into the one output folder
    nib.save(nib.Nifti1Image(data, affine), folder / f"{name}.nii.gz")
    run_inference(str(folder), parts["image_pattern"], parts["preprocessing"], ThresholdNet(), parts["inferer"],
                  parts["postprocessing"], str(ckpt), str(out))
    image, seg = nib.load(folder / f"{name}.nii.gz"), nib.load(out / f"{name}_seg.nii.gz")
    assert seg.shape == image.shape
    np.testing.assert_allclose(seg.affine, image.affine, rtol=0, atol=1e-4)
    pred = np.asarray(seg.dataobj) == 1
    truth = np.asarray(image.dataobj) > 50
    assert pred.any()
    world = lambda mask, aff: (aff @ np.append(np.argwhere(mask).mean(0), 1.0))[:3]
    # in-plane resizing to the network size and back (nearest) may move a boundary by one voxel
    voxel_diagonal = np.linalg.norm(np.linalg.norm(image.affine[:3, :3], axis=0))
    assert np.linalg.norm(world(pred, seg.affine) - world(truth, image.affine)) <= voxel_diagonal
    overlap = (pred & truth).sum() / (pred | truth).sum()
    assert overlap > 0.5
