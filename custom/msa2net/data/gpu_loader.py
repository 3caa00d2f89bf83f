"""Device-resident 2D training loader: all slices on the GPU once, augmentation in batch on the device.

The bundle's CPU path (``train.json``) samples slices and augments them one by one in DataLoader workers.
On a fast GPU that path, not the network, sets the pace. :class:`GPUSliceLoader` takes the *deterministic*
part of that pipeline (load, intensity normalisation, in-plane resize: the bundle's ``CacheDataset`` of
``train#deterministic_transforms``, or any sequence of ``{"image", "label"}`` dicts), unstacks every 2D
slice once into one tensor on the target device (image float16 or float32, label uint8) and, per
iteration, draws a batch and augments it on the device, for the whole batch at once, with the same
:class:`msa2net.data.augment.SliceAugmentation` (and the same ``augmentation_params``) as the CPU path.

It is an iterable with ``__len__`` (iterations per epoch), usable as ``SupervisedTrainer``'s
``train_data_loader`` (give the trainer ``epoch_length=len(loader)``), and yields
``{"image": (B, C, H, W) float32, "label": (B, 1, H, W) uint8}`` already on ``device``. It runs on the CPU
too (``device="cpu"``), which is how it is tested.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch

from msa2net.data.augment import SliceAugmentation
from msa2net.errors import InputError, source_name

__all__ = ["GPUSliceLoader", "stack_slices"]


def _plain(x) -> torch.Tensor:
    """A plain ``torch.Tensor`` (no MONAI metadata) from a tensor, MetaTensor or array."""
    if hasattr(x, "as_tensor"):
        x = x.as_tensor()
    return torch.as_tensor(x)


def _name(item, key: str, index: int) -> str:
    """The file ``item[key]`` was loaded from (MetaTensor metadata), else ``dataset item <index>``."""
    if isinstance(item, (list, tuple)):
        item = item[0] if item else {}
    return source_name(item.get(key) if isinstance(item, Mapping) else None, f"dataset item {index}")


def stack_slices(
    dataset: Sequence[dict],
    image_key: str = "image",
    label_key: str = "label",
    image_dtype: torch.dtype = torch.float16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unstack every 2D slice of ``dataset`` into ``(N, C, H, W)`` images and ``(N, 1, H, W)`` uint8 labels (CPU).

    Items are ``{"image": (C, H, W, D) or (C, H, W), "label": (1, H, W[, D])}`` with the same in-plane
    size ``H x W`` throughout (the bundle resizes to ``spatial_size`` first); 3D items give their ``D``
    slices along the last axis, 2D items one slice each. Labels must be whole numbers in ``[0, 255]``.

    Raises:
        ValueError: a list item (random sampling left in the pipeline), or an empty dataset.
        InputError: a missing key, mismatched image/label shapes, a different in-plane size or labels
            that are not whole numbers in ``[0, 255]``; the message starts with the item's image (or,
            for its labels, label) file, or ``dataset item <i>`` for items without file metadata.
    """
    images, labels = [], []
    plane = None
    for i in range(len(dataset)):
        item = dataset[i]
        if isinstance(item, (list, tuple)):
            raise ValueError(
                f"{_name(item, image_key, i)}: the dataset gives a list of samples; the loader needs the deterministic "
                "transforms only (drop RandSpatialCropSamplesd and the augmentation from the dataset's transform)."
            )
        if image_key not in item or label_key not in item:
            present = image_key if image_key in item else label_key
            raise InputError(f"{_name(item, present, i)}: lacks {image_key!r} or {label_key!r} (keys: {sorted(item)}).")
        img, lbl = _plain(item[image_key]), _plain(item[label_key])
        if img.ndim not in (3, 4) or lbl.ndim != img.ndim or lbl.shape[0] != 1 or lbl.shape[1:] != img.shape[1:]:
            raise InputError(
                f"{_name(item, image_key, i)}: expected image (C, H, W[, D]) and label (1, H, W[, D]) of the same spatial "
                f"shape, got {tuple(img.shape)} and {tuple(lbl.shape)}."
            )
        if plane is None:
            plane, first = tuple(img.shape[1:3]), _name(item, image_key, i)
        elif tuple(img.shape[1:3]) != plane:
            raise InputError(
                f"{_name(item, image_key, i)}: in-plane size {tuple(img.shape[1:3])} differs from {plane} of {first}; "
                "resize every item to spatial_size first."
            )
        if img.ndim == 4:  # (C, H, W, D) -> (D, C, H, W)
            img, lbl = img.permute(3, 0, 1, 2), lbl.permute(3, 0, 1, 2)
        else:
            img, lbl = img[None], lbl[None]
        lbl = lbl.float() if not lbl.dtype.is_floating_point else lbl
        rounded = lbl.round()
        if (rounded - lbl).abs().max() > 1e-3 or rounded.min() < 0 or rounded.max() > 255:
            raise InputError(
                f"{_name(item, label_key, i)}: labels must be whole numbers in [0, 255], found values in "
                f"[{float(lbl.min()):g}, {float(lbl.max()):g}]."
            )
        images.append(img.to(image_dtype))
        labels.append(rounded.to(torch.uint8))
    if not images:
        raise ValueError("the dataset is empty.")
    return torch.cat(images), torch.cat(labels)


class GPUSliceLoader:
    """Iterable of augmented 2D batches drawn from slices held on ``device``.

    Args:
        dataset: sequence of dicts after the deterministic transforms (e.g. the bundle's
            ``train#dataset`` with ``train#preprocessing`` reduced to ``train#deterministic_transforms``).
        batch_size: slices per batch.
        device: where the slices live and the augmentation runs (default: CUDA if available).
        image_dtype: storage type of the images on the device (float16 halves the memory; the
            batches are float32).
        samples_per_epoch: slices per epoch (default: all slices once); ``len(loader)`` is
            ``max(1, samples_per_epoch // batch_size)``, every batch is full. Slices are drawn from
            successive random permutations of all slices, so each is seen once before any repeats.
        augmentation: a :class:`~msa2net.data.augment.SliceAugmentation` or its keyword arguments (the
            bundle's ``augmentation_params``); ``None``: no augmentation.
        seed: batches are a function of ``(seed, epoch)`` alone (for one device type).
        rank, world_size: data-parallel training (``torchrun``; default: from ``torch.distributed`` when it is
            initialised). Every process draws the same global order of slices and takes its own
            ``batch_size`` share of each global batch of ``batch_size * world_size``, so the processes see
            disjoint slices; ``samples_per_epoch`` counts all processes together. Augmentation is drawn
            per process.
        channels_last: give the image batch in channels-last memory layout.
        image_key, label_key: dict keys in and out.

    Shapes: yields ``{"image": (B, C, H, W) float32, "label": (B, 1, H, W) uint8}``.
    """

    def __init__(
        self,
        dataset: Sequence[dict],
        batch_size: int = 24,
        device: str | torch.device | None = None,
        image_dtype: torch.dtype = torch.float16,
        samples_per_epoch: int | None = None,
        augmentation: SliceAugmentation | Mapping | None = None,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        channels_last: bool = False,
        image_key: str = "image",
        label_key: str = "label",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        if not isinstance(augmentation, SliceAugmentation):
            augmentation = SliceAugmentation(**dict(augmentation or {}))
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        images, labels = stack_slices(dataset, image_key, label_key, image_dtype)
        if augmentation.rot90_prob > 0 and images.shape[-1] != images.shape[-2]:
            raise ValueError(f"rot90 needs square slices, got {tuple(images.shape[-2:])}; resize first or set rot90_prob=0.")
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.batch_size = int(batch_size)
        self.samples_per_epoch = int(samples_per_epoch) if samples_per_epoch else len(self.images)
        self.augmentation = augmentation
        self.seed = int(seed)
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.world_size = int(world_size if world_size is not None else (torch.distributed.get_world_size() if dist else 1))
        self.rank = int(rank if rank is not None else (torch.distributed.get_rank() if dist else 0))
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must lie in [0, world_size), got rank={self.rank}, world_size={self.world_size}.")
        self.channels_last = bool(channels_last)
        self.image_key, self.label_key = image_key, label_key
        self.epoch = 0

    @property
    def num_slices(self) -> int:
        return len(self.images)

    def __len__(self) -> int:
        return max(1, self.samples_per_epoch // (self.batch_size * self.world_size))

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` give epoch ``epoch``'s batches (each ``iter()`` otherwise advances by one)."""
        self.epoch = int(epoch)

    def _generator(self, epoch: int, stream: int = 0) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed((self.seed * 1_000_003 + epoch + stream * 7_919_007) % (2**63 - 1))
        return g

    def __iter__(self) -> Iterator[dict]:
        g = self._generator(self.epoch)
        # One process keeps one generator (its batches stay what they were); several share the order only.
        g_aug = g if self.world_size == 1 else self._generator(self.epoch, stream=1 + self.rank)
        self.augmentation.reseed(g_aug.initial_seed())
        self.epoch += 1
        n, b = self.num_slices, self.batch_size
        gb = b * self.world_size
        order = torch.empty(0, dtype=torch.long, device=self.device)
        for _ in range(len(self)):
            while len(order) < gb:  # successive permutations: every slice once before any repeats
                order = torch.cat([order, torch.randperm(n, generator=g, device=self.device)])
            idx, order = order[self.rank * b : (self.rank + 1) * b], order[gb:]
            image, label = self.augmentation(self.images[idx].float(), self.labels[idx], g_aug)
            if self.channels_last:
                image = image.contiguous(memory_format=torch.channels_last)
            yield {self.image_key: image, self.label_key: label}
