"""NIfTI input and output for the bundle: fast for CT-sized volumes, and never half-written.

* :class:`FastNibabelReader`: MONAI's ``NibabelReader`` with two changes where the time of a
  512 x 512 x 200 CT goes. A ``.nii.gz`` is decompressed as a stream (python-isal, about twice
  zlib's speed, decompressing in a thread of its own; else the standard library) and each slab of
  slices is reordered from NIfTI's Fortran order into the C-ordered result while the next slab is
  being decompressed, so the reorder hides behind the decompression. Other files are reordered by
  :func:`reverse_axes` (two cache-friendly torch copies; numpy's or torch's one-step transposing copy
  took most of the read). :func:`load_imaged` has the voxels decoded straight into ``LoadImage``'s
  ``dtype`` (float32 by default) in that same pass. Otherwise unscaled voxels keep their stored type;
  voxels the header scales come as float32 (``NibabelReader`` gives float64, which ``LoadImage``'s
  default ``dtype`` turns into float32 anyway). Values, shape, affine and metadata are otherwise those
  of ``NibabelReader``; anything it does not cover (GPU loading, keyword arguments to ``nib.load``,
  ``as_closest_canonical``, big-endian or non-numeric data) goes to ``NibabelReader`` unchanged.
* Writers write under a temporary name, then rename (:func:`msa2net.atomic.atomic_path`).
  :class:`AtomicNibabelWriter` also casts and lays out the voxels in Fortran order where they lie
  (on the GPU for a label map made there, so only the small uint8 result crosses to the host) and
  compresses ``.nii.gz`` at level 1 (nibabel's default) on several threads: one standard gzip member,
  as pigz writes it, readable by nibabel, ITK and SimpleITK.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import warnings
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import ITKWriter, MetaTensor, NibabelReader, NibabelWriter, PILWriter
from monai.data.image_writer import ImageWriter
from monai.data.utils import correct_nifti_header_if_necessary, to_affine_nd
from monai.transforms import LoadImaged
from monai.config import DtypeLike
from monai.utils import convert_data_type, ensure_tuple, get_equivalent_dtype
from nibabel.arrayproxy import ArrayProxy

from msa2net.atomic import atomic_path

try:  # optional: python-isal (Intel ISA-L) decompresses and compresses gzip several times faster
    from isal import igzip as _gzip
    from isal import igzip_threaded as _gzip_threaded
except ImportError:  # pragma: no cover - exercised where isal is absent
    _gzip = _gzip_threaded = None

__all__ = [
    "FastNibabelReader", "load_imaged", "AtomicNibabelWriter", "AtomicPILWriter", "AtomicITKWriter", "atomic_writer_for",
    "gzip_backend", "reverse_axes", "compress_threads",
]

#: Bytes of voxels reordered at a time while the next ones are decompressed (a few MiB: large enough
#: for cache-friendly copies, small enough that the decompression thread is rarely waited for).
_SLAB_BYTES = 4 << 20
#: Bytes per compression block; each block is compressed by one thread.
_BLOCK_BYTES = 1 << 20
#: At most this many compression threads: cores are left to the inference that runs beside a background write.
_MAX_COMPRESS_THREADS = 8
_NIFTI1_HEADER = 348


def gzip_backend() -> str:
    """``"isal"`` or ``"zlib"``: what decompresses and compresses ``.nii.gz`` here."""
    return "isal" if _gzip is not None else "zlib"


def _gzip_bytes(data: bytes, level: int = 1) -> bytes:
    if _gzip is not None:
        return _gzip.compress(data, level)
    c = zlib.compressobj(level, zlib.DEFLATED, 31)  # 31: gzip container
    return c.compress(data) + c.flush()


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def compress_threads(nbytes: int) -> int:
    """Threads that compress ``nbytes``: one per 1 MiB block, at most the CPUs this process may use and at most 8."""
    return max(1, min(_usable_cpus(), _MAX_COMPRESS_THREADS, math.ceil(nbytes / _BLOCK_BYTES)))


def _write_gz(data: bytes, filename, level: int = 1, threads: int | None = None) -> None:
    """``data`` gzip-compressed into ``filename``: one gzip member, compressed on ``threads`` threads (default :func:`compress_threads`)."""
    threads = compress_threads(len(data)) if threads is None else threads
    if _gzip is None or threads <= 1:
        Path(filename).write_bytes(_gzip_bytes(data, level))
        return
    # pigz's scheme: blocks compressed in parallel, each primed with the previous block's last 32 KiB
    # and sync-flushed, joined into one deflate stream with one CRC.
    with _gzip_threaded.open(filename, "wb", compresslevel=level, threads=threads, block_size=_BLOCK_BYTES) as f:
        f.write(data)


def _torch_dtype(dtype: np.dtype) -> torch.dtype | None:
    try:
        return torch.from_numpy(np.empty(0, dtype=dtype)).dtype
    except TypeError:
        return None


def _scaling(proxy: ArrayProxy) -> tuple[float | None, float | None]:
    """The header's (slope, intercept) where they change the voxels (finite, not 1 and 0), else None each."""
    slope, inter = proxy.slope, proxy.inter
    scale = slope is not None and np.isfinite(slope) and slope not in (0, 1)
    shift = inter is not None and np.isfinite(inter) and inter != 0
    return (float(slope) if scale else None), (float(inter) if shift else None)


def _apply_scaling(t: torch.Tensor, slope: float | None, inter: float | None) -> None:
    if slope is not None:
        t.mul_(slope)
    if inter is not None:
        t.add_(inter)


def reverse_axes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``t`` with its axes in reverse order (a C-ordered array's Fortran layout, and back).

    On the CPU a 3D array goes through two copies that touch memory in long runs: a 2D transpose,
    which torch does blockwise, then a swap of whole rows; for a 512 x 512 x 200 volume that is two
    to four times faster than one transposing copy (measured on two and on one core of an AMD EPYC).
    """
    t = t.contiguous()
    if t.device.type != "cpu" or t.ndim != 3:
        return t.permute(*reversed(range(t.ndim))).contiguous()
    a, b, c = t.shape
    rows = t.view(a, b * c).t().contiguous().view(b, c, a)
    return rows.permute(1, 0, 2).contiguous()


def _read_into(f, view: memoryview, name) -> None:
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise OSError(f"{name}: the file ends before the voxels its header declares ({got} of {len(view)} bytes)")
        got += n


class _DecodedNifti(nib.Nifti1Image):
    """A NIfTI-1 image read from a stream whose voxels (``voxels``: C-ordered) were decoded while reading."""

    voxels: np.ndarray | None = None


def _open_gz(name):
    if _gzip is None:
        return gzip.open(name, "rb")
    # isal's reader decompresses in a thread of its own (it releases the GIL), a few MiB ahead
    return _gzip_threaded.open(name, "rb", threads=1, block_size=_BLOCK_BYTES)


def _decode_nifti_gz(name, dtype: torch.dtype | None = None) -> _DecodedNifti | None:
    """The single-file NIfTI-1 ``.nii.gz`` at ``name`` with its voxels decoded; None where nibabel must read it.

    Slab by slab along the last axis, each stored slab (Fortran order) is copied into its place in
    the C-ordered result, cast to ``dtype`` (default: the stored type, float32 where the header
    scales) and scaled as the header says, while the decompression thread goes on.
    """
    with _open_gz(name) as f:
        head = bytearray(f.read(352))
        if len(head) < 352 or head[344:348] != b"n+1\x00" or struct.unpack("<i", head[:4])[0] != _NIFTI1_HEADER:
            return None  # not NIfTI-1, NIfTI-2, or big-endian
        vox_offset = int(struct.unpack("<f", head[108:112])[0])
        if vox_offset > len(head):  # header extensions
            rest = bytearray(vox_offset - len(head))
            _read_into(f, memoryview(rest), name)
            head += rest
        img = _DecodedNifti.from_bytes(bytes(head))  # header only: the array proxy is never read
        proxy = img.dataobj
        torch_dtype = _torch_dtype(proxy.dtype)
        if proxy.order != "F" or proxy.offset != vox_offset or not proxy.dtype.isnative or torch_dtype is None or len(proxy.shape) < 2:
            return None
        shape = proxy.shape
        slope, inter = _scaling(proxy)
        if slope is not None or inter is not None:
            dtype = dtype if dtype is not None and dtype.is_floating_point else torch.float32
        out = torch.empty(shape, dtype=dtype or torch_dtype)
        slice_items = math.prod(shape[:-1])
        step = max(1, _SLAB_BYTES // (slice_items * proxy.dtype.itemsize))
        buf = bytearray(min(step, shape[-1]) * slice_items * proxy.dtype.itemsize)
        reverse = list(reversed(range(len(shape))))
        for first in range(0, shape[-1], step):
            last = min(shape[-1], first + step)
            view = memoryview(buf)[: (last - first) * slice_items * proxy.dtype.itemsize]
            _read_into(f, view, name)
            slab = torch.frombuffer(view, dtype=torch_dtype).view(last - first, *reversed(shape[:-1]))
            dst = out[..., first:last]
            dst.copy_(slab.permute(*reverse))
            _apply_scaling(dst, slope, inter)
        while f.read(_BLOCK_BYTES):  # to the end: the gzip CRC check of the whole file happens there
            pass
    img.voxels = out.numpy()
    return img


class FastNibabelReader(NibabelReader):
    """``NibabelReader`` that decodes ``.nii.gz`` while decompressing and returns C-ordered voxels.

    Args:
        dtype: the voxel type a ``.nii.gz`` is decoded into, in the same pass as the reorder (give
            ``LoadImage``'s ``dtype``, so that its conversion finds nothing left to do); ``None``:
            the stored type (float32 where the header scales).
        args, kwargs: as :class:`monai.data.NibabelReader`.
    """

    def __init__(self, *args, dtype: DtypeLike | torch.dtype | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.dtype = dtype if dtype is None or isinstance(dtype, torch.dtype) else _torch_dtype(np.dtype(dtype))

    def read(self, data, **kwargs):
        if kwargs or self.kwargs:
            return super().read(data, **kwargs)
        filenames = ensure_tuple(data)
        self.filenames = filenames
        images = []
        for name in filenames:
            img = None
            if str(name).endswith(".gz") and not self.to_gpu and not self.as_closest_canonical:
                with open(name, "rb") as fh:
                    is_gzip = fh.read(2) == b"\x1f\x8b"
                img = _decode_nifti_gz(name, self.dtype) if is_gzip else None
            if img is None:  # not gzip, empty, NIfTI-2, uncompressed: nibabel's own reading and error messages
                img = nib.load(name)
            images.append(correct_nifti_header_if_necessary(img))
        return images if len(filenames) > 1 else images[0]

    def _get_array_data(self, img, filename):
        if isinstance(img, _DecodedNifti) and img.voxels is not None:
            return img.voxels
        proxy = img.dataobj
        if self.to_gpu or not isinstance(proxy, ArrayProxy) or proxy.order != "F":
            return super()._get_array_data(img, filename)
        raw = proxy.get_unscaled()
        if not raw.dtype.isnative or _torch_dtype(raw.dtype) is None or raw.ndim < 2:
            return super()._get_array_data(img, filename)
        with warnings.catch_warnings():  # a read-only memory map; it is only read here
            warnings.simplefilter("ignore", UserWarning)
            out = reverse_axes(torch.from_numpy(raw.T))
        slope, inter = _scaling(proxy)
        if slope is not None or inter is not None:
            out = out.to(torch.float32)
        _apply_scaling(out, slope, inter)
        return out.numpy()


def load_imaged(keys, **kwargs) -> LoadImaged:
    """MONAI's ``LoadImaged`` (same arguments) with :class:`FastNibabelReader` registered for NIfTI files.

    Registering, rather than passing ``reader=``, keeps ``LoadImage``'s automatic choice: the first
    reader that claims a file's suffix reads it and its error is raised as is (a given ``reader`` makes
    ``LoadImage`` try every reader in turn and join their tracebacks into one message).
    """
    transform = LoadImaged(keys, **kwargs)
    transform.register(FastNibabelReader(dtype=kwargs.get("dtype", np.float32)))  # LoadImaged's default dtype
    return transform


class _AtomicWrite:
    def write(self, filename, verbose: bool = False, **kwargs) -> None:
        with atomic_path(filename) as tmp:
            super().write(str(tmp), verbose=verbose, **kwargs)


def _fortran_ordered(data, dtype) -> np.ndarray:
    """``data`` (C-ordered array or tensor, on any device) cast to ``dtype``, laid out in Fortran order on the host.

    The cast and the reorder happen where the data lies: on a GPU both take a millisecond, and a
    uint8 label map crosses to the host at a quarter of float32's size.
    """
    t = torch.as_tensor(data).detach()
    if isinstance(t, MetaTensor):  # plain tensor ops: no metadata bookkeeping on the way
        t = t.as_tensor()
    target = _torch_dtype(np.dtype(dtype)) if dtype is not None else t.dtype
    if target is None or t.ndim < 2:
        return np.asarray(t.cpu().numpy(), dtype=dtype)
    if target != t.dtype:
        t = t.to(target)
    return reverse_axes(t).cpu().numpy().T


class _FastNibabelWriter(NibabelWriter):
    """``NibabelWriter`` with Fortran-ordered voxels laid out by torch and a multi-threaded gzip for ``.nii.gz``.

    ``compress_threads`` (a constructor keyword, as ``ImageWriter`` takes any): threads compressing
    ``.nii.gz``; ``None`` (default) chooses by :func:`compress_threads`, ``1`` compresses in one call.
    """

    compress_threads: int | None = None

    @classmethod
    def create_backend_obj(cls, data_array, affine=None, dtype=None, **kwargs):
        # As NibabelWriter's, without its C-contiguous copy (NIfTI stores Fortran order).
        dtype = None if dtype is None else np.dtype(get_equivalent_dtype(dtype, np.ndarray))
        affine = np.eye(4) if affine is None else convert_data_type(affine, np.ndarray)[0]
        return nib.Nifti1Image(
            _fortran_ordered(data_array, dtype),
            to_affine_nd(r=3, affine=affine),
            header=kwargs.pop("header", None),
            extra=kwargs.pop("extra", None),
            file_map=kwargs.pop("file_map", None),
        )

    def set_metadata(self, meta_dict, resample: bool = True, **options) -> None:
        if resample:
            return super().set_metadata(meta_dict, resample=resample, **options)
        # Without resampling, NibabelWriter's SpatialResample only copies the voxels to float64 and
        # keeps the affine; take the affine directly (a label map then stays uint8 end to end).
        _, affine, _ = self.get_meta_info(meta_dict)
        if self.output_dtype is None and getattr(self.data_obj, "dtype", None) is not None:
            self.output_dtype = self.data_obj.dtype
        if affine is None:
            affine = self.data_obj.affine if isinstance(self.data_obj, MetaTensor) else np.eye(4)
        self.affine = affine

    def write(self, filename, verbose: bool = False, **obj_kwargs) -> None:
        if not str(filename).endswith(".gz"):
            return super().write(filename, verbose=verbose, **obj_kwargs)
        ImageWriter.write(self, filename, verbose=verbose)
        img = self.create_backend_obj(self.data_obj, affine=self.affine, dtype=self.output_dtype, **obj_kwargs)
        # the s/q-forms as NibabelWriter sets them
        affine = to_affine_nd(r=3, affine=convert_data_type(np.eye(4) if self.affine is None else self.affine, np.ndarray)[0])
        img.set_sform(affine, code=1)
        img.set_qform(affine, code=1)
        _write_gz(img.to_bytes(), filename, threads=self.compress_threads)


class AtomicNibabelWriter(_AtomicWrite, _FastNibabelWriter):
    """NIfTI writer: fast layout and compression, atomic rename."""


class AtomicPILWriter(_AtomicWrite, PILWriter):
    """PNG/JPEG writer with an atomic rename."""


class AtomicITKWriter(_AtomicWrite, ITKWriter):
    """ITK (NRRD, MHA, ...) writer with an atomic rename."""


def atomic_writer_for(output_ext: str) -> type:
    """The atomic writer class for an output extension such as ``.nii.gz`` or ``.png``."""
    ext = output_ext.lower()
    if ext in (".nii", ".nii.gz"):
        return AtomicNibabelWriter
    if ext in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"):
        return AtomicPILWriter
    if ext in (".nrrd", ".mha", ".mhd", ".nhdr"):
        return AtomicITKWriter
    raise ValueError(f"no writer for output extension {output_ext!r}; use .nii.gz, .png, .nrrd or .mha.")
