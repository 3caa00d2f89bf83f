"""GPUSliceLoader on the CPU (augmentation itself: test_augment.py): shapes, label values, joint image/label motion, determinism, epoch length, bundle use."""

import json
import math
from pathlib import Path

import pytest
import torch
from monai.data import MetaTensor

from msa2net.data.gpu_loader import GPUSliceLoader, stack_slices
from msa2net.errors import InputError

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"


def blob_volume(seed: int, size: int = 32, depth: int = 5, channels: int = 1):
    """A smooth image whose label is an exact threshold of it: label = (image > 0.5) + (image > 0.75)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    slices = []
    for _ in range(depth):
        cy, cx = (torch.rand(2, generator=g) * 0.4 + 0.2) * size  # off-centre, so rotations move it
        ry, rx = (torch.rand(2, generator=g) * 0.15 + 0.12) * size
        slices.append(torch.exp(-(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)))
    image = torch.stack(slices, -1)[None].repeat(channels, 1, 1, 1).half().float()  # (C, H, W, D), fp16-exact
    label = ((image[:1] > 0.5).to(torch.uint8) + (image[:1] > 0.75).to(torch.uint8))  # (1, H, W, D)
    return {"image": image, "label": label}


def threshold(image):
    return (image[:, :1] > 0.5).to(torch.uint8) + (image[:, :1] > 0.75).to(torch.uint8)


#: rot90 and flips only: exact index permutations, so labels stay an exact function of the image.
EXACT = {"rot90_prob": 0.5, "flip_prob": 0.5}
#: rotation only (bilinear image, nearest label).
ROTATE = {"rotate_prob": 1.0, "rotate_range": 0.35}
#: the bundle's training augmentation.
FULL = json.loads((BUNDLE / "configs" / "train.json").read_text())["augmentation_params"]


@pytest.fixture
def volumes():
    return [blob_volume(s) for s in range(4)]


def test_slices_are_unstacked_once(volumes):
    images, labels = stack_slices(volumes)
    assert images.shape == (20, 1, 32, 32) and images.dtype == torch.float16
    assert labels.shape == (20, 1, 32, 32) and labels.dtype == torch.uint8
    assert torch.equal(labels[6], volumes[1]["label"][..., 1])


def test_2d_items_and_rgb(volumes):
    items = [{"image": v["image"][..., 0].repeat(3, 1, 1), "label": v["label"][..., 0].float()} for v in volumes]
    loader = GPUSliceLoader(items, batch_size=2, device="cpu", samples_per_epoch=4)
    assert loader.num_slices == 4 and len(loader) == 2
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 3, 32, 32) and batch["label"].shape == (2, 1, 32, 32)


def test_shapes_types_and_label_values(volumes):
    loader = GPUSliceLoader(volumes, batch_size=8, device="cpu", augmentation=FULL)
    for batch in loader:
        assert batch["image"].shape == (8, 1, 32, 32) and batch["image"].dtype == torch.float32
        assert batch["label"].shape == (8, 1, 32, 32) and batch["label"].dtype == torch.uint8
        assert set(batch["label"].unique().tolist()) <= {0, 1, 2}


def test_epoch_length_and_full_batches(volumes):
    loader = GPUSliceLoader(volumes, batch_size=6, device="cpu")
    assert len(loader) == 20 // 6
    assert sum(1 for _ in loader) == len(loader)
    loader = GPUSliceLoader(volumes, batch_size=6, device="cpu", samples_per_epoch=50)
    batches = list(loader)
    assert len(batches) == len(loader) == 8
    assert all(b["image"].shape[0] == 6 for b in batches)
    assert len(GPUSliceLoader(volumes, batch_size=64, device="cpu")) == 1  # never empty


def test_every_slice_is_seen_once_per_epoch_without_augmentation(volumes):
    loader = GPUSliceLoader(volumes, batch_size=5, device="cpu")
    seen = torch.cat([b["image"] for b in loader])
    ref = loader.images.float()
    match = (seen[:, None] - ref[None]).abs().flatten(2).amax(-1) == 0  # (drawn, stored)
    assert match.any(1).all() and torch.equal(match.sum(0), torch.ones(20, dtype=torch.long))


def test_rot90_and_flips_move_image_and_label_exactly_together(volumes):
    loader = GPUSliceLoader(volumes, batch_size=20, device="cpu", augmentation=EXACT, seed=3)
    changed = 0
    for epoch in range(3):
        batch = next(iter(loader))
        assert torch.equal(batch["label"], threshold(batch["image"]))
        stored = {tuple(t.flatten().tolist()) for t in loader.images.float()}
        changed += sum(tuple(t.flatten().tolist()) not in stored for t in batch["image"])
    assert changed > 20  # most samples were turned or flipped (p = 1 - 0.5**3 each)


def test_rotation_moves_image_and_label_together_up_to_border_interpolation(volumes):
    loader = GPUSliceLoader(volumes, batch_size=20, device="cpu", augmentation=ROTATE, seed=1)
    batch = next(iter(loader))
    img, lbl = batch["image"], batch["label"]
    ref = threshold(img)
    mismatch = lbl != ref
    # bilinear (image) and nearest (label) differ only next to a region boundary: within one pixel of
    # a pixel of another class
    f = ref.float()
    near = torch.nn.functional.max_pool2d(f, 3, 1, 1) != -torch.nn.functional.max_pool2d(-f, 3, 1, 1)
    assert mismatch.float().mean() < 0.02
    assert (mismatch & ~near).sum() == 0
    # ...and the rotation really moved things: labels differ from the unrotated stored ones
    stored = loader.labels
    moved = [(lbl[i : i + 1] != stored).flatten(1).any(1).all() for i in range(len(lbl)) if lbl[i].any()]
    assert sum(bool(m) for m in moved) >= 0.6 * len(moved)  # tiny angles may leave a label unchanged


def test_rotation_is_nearest_for_labels_and_bilinear_for_images():
    item = {"image": torch.rand(1, 16, 16, 4), "label": torch.randint(0, 4, (1, 16, 16, 4), dtype=torch.uint8)}
    loader = GPUSliceLoader([item], batch_size=4, device="cpu", augmentation=ROTATE)
    batch = next(iter(loader))
    assert set(batch["label"].unique().tolist()) <= {0, 1, 2, 3}
    stored = {round(v, 3) for v in loader.images.float().flatten().tolist()} | {0.0}
    new_values = {round(v, 3) for v in batch["image"].flatten().tolist()} - stored
    assert new_values  # bilinear mixes neighbours


def test_seed_determinism(volumes):
    def draw(seed):
        loader = GPUSliceLoader(volumes, batch_size=4, device="cpu", augmentation=FULL, seed=seed)
        return [torch.cat([b["image"].flatten(), b["label"].float().flatten()]) for e in range(2) for b in loader]

    a, b, c = draw(7), draw(7), draw(8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_set_epoch_replays_an_epoch(volumes):
    loader = GPUSliceLoader(volumes, batch_size=4, device="cpu", augmentation=FULL)
    first = [b["image"] for b in loader]
    second = [b["image"] for b in loader]
    assert not all(torch.equal(x, y) for x, y in zip(first, second))
    loader.set_epoch(0)
    assert all(torch.equal(x, y) for x, y in zip(first, [b["image"] for b in loader]))


def test_channels_last(volumes):
    loader = GPUSliceLoader(volumes, batch_size=4, device="cpu", channels_last=True)
    assert next(iter(loader))["image"].is_contiguous(memory_format=torch.channels_last)


def test_bad_inputs_fail_clearly(volumes):
    with pytest.raises(ValueError, match="dataset item 0: the dataset gives a list"):
        GPUSliceLoader([[volumes[0]]], device="cpu")
    bad = dict(volumes[1], label=volumes[1]["label"][..., :3])
    with pytest.raises(ValueError, match="item 1: expected image"):
        GPUSliceLoader([volumes[0], bad], device="cpu")
    other = blob_volume(0, size=16)
    with pytest.raises(ValueError, match="item 1: in-plane size"):
        GPUSliceLoader([volumes[0], other], device="cpu")
    with pytest.raises(ValueError, match="whole numbers"):
        GPUSliceLoader([dict(volumes[0], label=volumes[0]["label"] * 0.5)], device="cpu")
    with pytest.raises(ValueError, match=r"whole numbers in \[0, 255\], found values in \[0, 300\]"):
        GPUSliceLoader([dict(volumes[0], label=volumes[0]["label"].float() * 150)], device="cpu")
    with pytest.raises(ValueError, match="square"):
        GPUSliceLoader([{"image": torch.rand(1, 16, 32), "label": torch.zeros(1, 16, 32)}], device="cpu", augmentation=EXACT)


def test_bad_items_are_named_by_their_files(volumes):
    def loaded(item, stem):
        return {k: MetaTensor(v, meta={"filename_or_obj": f"/data/{k}s/{stem}.nii.gz"}) for k, v in item.items()}

    good = loaded(volumes[0], "case_0")
    with pytest.raises(InputError, match=r"^/data/labels/case_1.nii.gz: labels must be whole numbers"):
        GPUSliceLoader([good, loaded(dict(volumes[1], label=volumes[1]["label"] * 0.5), "case_1")], device="cpu")
    with pytest.raises(InputError, match=r"^/data/images/case_2.nii.gz: in-plane size \(16, 16\) differs from \(32, 32\) of /data/images/case_0.nii.gz"):
        GPUSliceLoader([good, loaded(blob_volume(2, size=16), "case_2")], device="cpu")
    with pytest.raises(InputError, match=r"^/data/images/case_3.nii.gz: expected image"):
        GPUSliceLoader([good, loaded(dict(volumes[3], label=volumes[3]["label"][..., :3]), "case_3")], device="cpu")
    with pytest.raises(ValueError, match=r"^/data/images/case_0.nii.gz: the dataset gives a list"):
        GPUSliceLoader([[good]], device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_shapes(volumes):
    loader = GPUSliceLoader(volumes, batch_size=8, device="cuda", augmentation=EXACT)
    batch = next(iter(loader))
    assert batch["image"].is_cuda and batch["label"].is_cuda
    assert torch.equal(batch["label"], threshold(batch["image"]))


def test_bundle_override_swaps_the_train_loader(tmp_path):
    """train.json + synthetic profile + gpu_train.json: the loader is ours and one epoch trains on the CPU."""
    from monai.bundle import ConfigParser

    from msa2net.data.synthetic import make_volume_dataset

    make_volume_dataset(tmp_path / "data", num_cases=4, shape=(40, 40, 6), num_validation=1)
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / f) for f in ("train.json", "profile_synthetic.json", "gpu_train.json")])
    parser.update(
        {
            "bundle_root": str(BUNDLE),
            "dataset_dir": str(tmp_path / "data"),
            "ckpt_dir": str(tmp_path / "ckpt"),
            "output_dir": str(tmp_path / "out"),
            "device": "$torch.device('cpu')",
            "max_epochs": 1,
            "val_interval": 1,
            "cache_rate": 1.0,
        }
    )
    parser.parse()
    loader = parser.get_parsed_content("train#dataloader")
    assert isinstance(loader, GPUSliceLoader)
    # the random part of train.json is gone from the CPU dataset
    names = [type(t).__name__ for t in parser.get_parsed_content("train#dataset").transform.transforms]
    assert not any(n.startswith("Rand") for n in names)
    assert loader.samples_per_epoch == 3 * parser.get_parsed_content("slices_per_volume")
    batch = next(iter(loader))
    size = parser.get_parsed_content("spatial_size")
    assert batch["image"].shape == (parser.get_parsed_content("batch_size"), 1, *size)
    trainer = parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch_length == len(loader)
    trainer.run()
    assert trainer.state.iteration == len(loader)
    log = (tmp_path / "out" / "training_log.csv").read_text().splitlines()
    assert len(log) == 2 and math.isfinite(float(log[1].split(",")[3]))


def test_data_parallel_ranks_share_the_order_and_take_disjoint_slices():
    # Slice i holds the constant i, so a batch names its slices; no augmentation.
    data = [{"image": torch.arange(12.0).view(1, 1, 1, 12).expand(1, 4, 4, 12).clone(), "label": torch.zeros(1, 4, 4, 12, dtype=torch.uint8)}]
    opts = dict(batch_size=3, device="cpu", image_dtype=torch.float32, samples_per_epoch=12, seed=5)
    single = GPUSliceLoader(data, **opts)
    ranks = [GPUSliceLoader(data, rank=r, world_size=2, **opts) for r in range(2)]
    assert len(single) == 4 and all(len(r) == 2 for r in ranks)
    names = [[b["image"][:, 0, 0, 0].long().tolist() for b in r] for r in ranks]
    for step in range(2):
        assert not set(names[0][step]) & set(names[1][step])
    seen = sorted(i for r in names for batch in r for i in batch)
    assert seen == list(range(12))  # one epoch of 12 slices, each once, across both processes
    with pytest.raises(ValueError, match="rank"):
        GPUSliceLoader(data, rank=2, world_size=2, **opts)
