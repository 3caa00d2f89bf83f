"""Exact resampling: ground truth sent through the bundle's in-plane resize and back keeps its Dice, labels stay aligned."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser
from monai.data import MetaTensor

from conftest import shared_data
from monai.transforms import Resized

from msa2net.errors import InputError
from msa2net.resample import ResizeImaged, ResizeLabeld, RestoreLabeld, resize_label, restore_label

CONFIGS = Path(__file__).resolve().parents[1] / "bundle" / "configs"


def bundle_resize(profile: str):
    """The image resize of the bundle (train.json + profile), as training, validation and inference apply it."""
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / f"profile_{profile}.json")])
    return parser.get_parsed_content("resize_transforms")[0]


def dice(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    a, b = a == k, b == k
    total = int(a.sum() + b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0


def round_trip(label: np.ndarray, profile: str) -> list[float]:
    """Per-class Dice of ``label`` (H, W[, D]) after: one-hot -> the bundle's image resize (a perfect network output
    on the network's grid) -> :class:`RestoreLabeld` (probabilities resized back bilinearly, argmax)."""
    lbl = torch.as_tensor(label, dtype=torch.long)
    k = int(lbl.max()) + 1
    onehot = F.one_hot(lbl, k).movedim(-1, 0).float()  # (K, H, W[, D])
    data = bundle_resize(profile)({"image": MetaTensor(onehot, affine=torch.diag(torch.tensor([0.7, 0.8, 2.0, 1.0])))})
    data["pred"] = data["image"].as_tensor().clamp_min(1e-6).log()  # logits of that probability map
    restored = RestoreLabeld(keys="pred", ref_key="image")(data)["pred"]
    assert tuple(restored.shape[1:]) == tuple(lbl.shape)
    assert np.allclose(np.asarray(restored.affine), np.diag([0.7, 0.8, 2.0, 1.0]), atol=1e-6)
    return [dice(restored[0], lbl, c) for c in range(1, k)]


def ellipses(shape, organs):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    lab = np.zeros(shape, np.uint8)
    for i, (cy, cx, ry, rx) in enumerate(organs, start=1):
        lab[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = i
    return lab


@pytest.mark.parametrize("shape", [(154, 181), (512, 428), (224, 224)])
def test_acdc_like_ground_truth_survives_resize_and_restore(shape):
    h, w = shape
    # RV, a myocardial ring around the LV blood pool, as in a short-axis slice
    lab = ellipses(shape, [(h * 0.45, w * 0.35, h * 0.12, w * 0.09), (h * 0.5, w * 0.55, h * 0.14, w * 0.13)])
    lv = ellipses(shape, [(h * 0.5, w * 0.55, h * 0.09, w * 0.085)])
    lab[lab == 2] = 2
    lab[lv == 1] = 3
    vol = np.stack([lab, np.roll(lab, 3, 0), np.roll(lab, -2, 1)], -1)
    assert min(round_trip(vol, "acdc")) >= 0.99


def test_ct_slice_with_eight_organs_survives_resize_and_restore():
    # 512x512 at about 0.8 mm: aorta ~2.5 cm and gallbladder ~3 cm across, pancreas a thin band
    organs = [(256, 300, 15, 15), (335, 330, 18, 22), (300, 390, 30, 22), (300, 130, 30, 22),
              (170, 150, 70, 60), (280, 240, 12, 45), (180, 400, 40, 28), (160, 290, 35, 30)]
    per_class = round_trip(ellipses((512, 512), organs)[..., None], "synapse")  # one slice of a volume
    assert len(per_class) == 8 and min(per_class) >= 0.99, per_class


def test_real_acdc_ground_truth_survives_resize_and_restore():
    root = shared_data("acdc")
    items = json.loads((root / "dataset.json").read_text())["validation"][:6]
    for item in items:
        lab = nib.load(root / item["label"]).get_fdata().round().astype(np.uint8)
        assert min(round_trip(lab, "acdc")) >= 0.99, item["label"]


def test_training_labels_stay_aligned_with_the_image():
    """A label that is a threshold of the image keeps the image's position after both are resized
    (torch's legacy nearest puts it about half an output pixel off)."""
    yy, xx = torch.meshgrid(torch.arange(181.0), torch.arange(154.0), indexing="ij")
    image = torch.exp(-(((yy - 90) / 40) ** 2 + ((xx - 70) / 30) ** 2))[None, ..., None]  # (1, H, W, 1)
    label = (image > 0.5).to(torch.uint8)
    small_img = bundle_resize("acdc")({"image": MetaTensor(image)})["image"]
    small_lbl = ResizeLabeld("label", [224, 224, -1])({"label": MetaTensor(label)})["label"]
    legacy = F.interpolate(label.permute(3, 0, 1, 2).float(), size=(224, 224), mode="nearest")[0, 0]

    def centroid(mask):
        idx = torch.nonzero(mask).float()
        return idx.mean(0)

    truth = centroid(small_img.as_tensor()[0, ..., 0] > 0.5)
    assert (centroid(small_lbl.as_tensor()[0, ..., 0] > 0) - truth).abs().max() < 0.1
    assert (centroid(legacy > 0) - truth).abs().max() > 0.3


def test_resize_label_is_chunk_independent_and_whole():
    lab = torch.randint(0, 5, (1, 97, 131, 9), dtype=torch.uint8)
    a = resize_label(lab, (64, 64), chunk=2)
    b = resize_label(lab, (64, 64), chunk=32)
    assert torch.equal(a, b) and a.dtype == torch.uint8 and a.shape == (1, 64, 64, 9) and int(a.max()) <= 4


def test_restore_is_chunk_independent_and_handles_2d():
    pred = torch.randn(3, 32, 32, 5)
    assert torch.equal(restore_label(pred, (50, 70), chunk=1), restore_label(pred, (50, 70), chunk=16))
    two_d = restore_label(torch.randn(2, 32, 32), (40, 48))
    assert two_d.shape == (1, 40, 48)


def test_bad_shapes_fail_clearly():
    with pytest.raises(ValueError, match="label map"):
        resize_label(torch.zeros(2, 8, 8), (4, 4))
    with pytest.raises(ValueError, match="whole numbers"):
        resize_label(torch.full((1, 8, 8), 300.0), (4, 4))
    with pytest.raises(ValueError, match="does not match"):
        RestoreLabeld("pred")({"image": torch.zeros(1, 8, 8, 2), "pred": torch.zeros(3, 8, 8, 3)})


def test_label_values_beyond_the_classes_name_the_file_before_one_hot():
    label = torch.zeros(1, 8, 8, 2)
    label[0, 2, 2, 1], label[0, 3, 3, 0] = 13, 9
    item = {"label": MetaTensor(label, meta={"filename_or_obj": "/data/label0001.nii.gz"})}
    with pytest.raises(InputError, match=r"^/data/label0001.nii.gz: label values 9, 13 do not exist in this profile, which has 9 classes"):
        ResizeLabeld("label", (4, 4), num_classes=9)(item)
    assert ResizeLabeld("label", (4, 4), num_classes=14)(item)["label"].shape == (1, 4, 4, 2)


OBLIQUE = torch.tensor([[0.0, -1.2, 0.1, 40.0], [1.4, 0.0, 0.0, -20.0], [0.0, 0.05, 8.0, 5.0], [0, 0, 0, 1]], dtype=torch.float64)


def test_resize_imaged_equals_monai_resized_without_anti_aliasing():
    image = MetaTensor(torch.rand(2, 150, 171, 5), affine=OBLIQUE)
    ours = ResizeImaged("image", [224, 224, -1])({"image": image})["image"]
    monai = Resized("image", [224, 224, -1], mode="bilinear")({"image": image})["image"]
    torch.testing.assert_close(ours.as_tensor(), monai.as_tensor(), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.affine, monai.affine)
    assert ours.applied_operations[-1]["orig_size"] == (150, 171, 5)


def test_resize_imaged_anti_aliasing_averages_what_down_sampling_would_skip():
    stripes = torch.zeros(1, 512, 512, 2)
    stripes[:, ::2] = 1.0  # one-pixel stripes: finer than the 224 grid can hold
    plain = ResizeImaged("image", [224, 224])({"image": MetaTensor(stripes)})["image"]
    smooth = ResizeImaged("image", [224, 224], anti_aliasing=True)({"image": MetaTensor(stripes)})["image"]
    assert float(plain.std()) > 0.2  # aliasing: a beat pattern of the stripes
    assert float(smooth.std()) < 0.05 and abs(float(smooth.mean()) - 0.5) < 0.02


def test_prediction_restored_after_resize_imaged_keeps_oblique_geometry():
    image = MetaTensor(torch.rand(1, 150, 170, 12), affine=OBLIQUE)
    data = ResizeImaged("image", [224, 224, -1], anti_aliasing=True)({"image": image})
    data["pred"] = torch.rand(4, 224, 224, 12)
    restored = RestoreLabeld("pred")(data)["pred"]
    assert tuple(restored.shape) == (1, 150, 170, 12)
    torch.testing.assert_close(restored.affine, OBLIQUE.to(restored.affine.dtype))

