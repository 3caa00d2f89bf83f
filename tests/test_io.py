"""The fast NIfTI reader and writer give exactly what MONAI's NibabelReader and NibabelWriter give."""

import gzip
import resource
import signal
import zlib

import itk
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import NibabelReader, NibabelWriter
from monai.transforms import LoadImage

import msa2net.io
from msa2net.io import AtomicNibabelWriter, FastNibabelReader, load_imaged

OBLIQUE = np.array([[0.68, -0.12, 0.3, 12.0], [0.1, 0.7, 0.05, -40.0], [-0.2, 0.0, 2.4, 7.5], [0, 0, 0, 1]])


def volume(dtype, shape=(23, 17, 9), seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(0, 300, size=shape)).astype(dtype)


@pytest.mark.parametrize(
    "dtype,ext,slope_inter,affine",
    [
        (np.int16, ".nii.gz", None, np.diag([-0.7, -0.7, 2.5, 1.0])),  # LPS-style, as DICOM converters write
        (np.float32, ".nii", None, np.diag([1.2, 0.9, 3.0, 1.0])),  # RAS
        (np.int16, ".nii.gz", (0.5, -1024.0), OBLIQUE),  # scaled voxels, oblique
        (np.uint8, ".nii.gz", None, OBLIQUE),
        (np.dtype(">i2"), ".nii.gz", None, np.eye(4)),  # big-endian: NibabelReader's own path
    ],
)
def test_fast_reader_equals_nibabel_reader(tmp_path, dtype, ext, slope_inter, affine):
    img = nib.Nifti1Image(volume(dtype), affine)
    if slope_inter:
        img.header.set_slope_inter(*slope_inter)
    path = tmp_path / f"v{ext}"
    nib.save(img, path)
    ref = LoadImage(reader=NibabelReader, image_only=True)(path)
    stored = LoadImage(reader=FastNibabelReader, image_only=True)(path)  # decoded in the stored type, cast by LoadImage
    fused = load_imaged("image", image_only=True)({"image": path})["image"]  # decoded straight into float32
    for got in (stored, fused):
        assert got.dtype == ref.dtype == torch.float32 and got.is_contiguous()
        torch.testing.assert_close(got.as_tensor(), ref.as_tensor(), rtol=0, atol=0)
        np.testing.assert_allclose(got.affine, ref.affine)
        assert set(got.meta) == set(ref.meta)
        np.testing.assert_array_equal(got.meta["spatial_shape"], ref.meta["spatial_shape"])


@pytest.mark.parametrize("backend", ["installed", "standard library"])
def test_unscaled_voxels_keep_their_type_and_multi_member_gzip_reads(tmp_path, monkeypatch, backend):
    if backend == "standard library":
        monkeypatch.setattr(msa2net.io, "_gzip", None)
    img = nib.Nifti1Image(volume(np.uint8), np.eye(4))
    path = tmp_path / "labels.nii"
    nib.save(img, path)
    gz = tmp_path / "labels.nii.gz"
    raw = path.read_bytes()
    gz.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))  # two members, as bgzip writes
    ref = LoadImage(reader=NibabelReader, image_only=True, dtype=None)(path)
    got = load_imaged("label", image_only=True, dtype=None)({"label": gz})["label"]
    assert got.dtype == ref.dtype == torch.uint8
    assert torch.equal(got.as_tensor(), ref.as_tensor())


def test_fast_reader_errors_name_the_problem(tmp_path):
    path = tmp_path / "cut.nii.gz"
    nib.save(nib.Nifti1Image(volume(np.int16), np.eye(4)), path)
    path.write_bytes(path.read_bytes()[:400])
    with pytest.raises(EOFError, match="Compressed file ended"):
        load_imaged("image", image_only=True)({"image": path})
    path.write_bytes(b"")
    with pytest.raises(Exception, match="Empty file"):
        load_imaged("image", image_only=True)({"image": path})
    path.write_bytes(gzip.compress(b"a short gzip-compressed text, not an image"))
    with pytest.raises(Exception, match="Cannot work out file type"):
        load_imaged("image", image_only=True)({"image": path})


@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
@pytest.mark.parametrize("affine", [np.diag([-0.7, -0.7, 2.5, 1.0]), OBLIQUE])
def test_writer_output_equals_nibabel_writer(tmp_path, ext, affine):
    label = torch.from_numpy(np.random.default_rng(1).integers(0, 4, size=(31, 20, 7)).astype(np.float32))
    files = {}
    for cls in (NibabelWriter, AtomicNibabelWriter):
        w = cls(output_dtype=np.uint8)
        w.set_data_array(label, channel_dim=None)
        w.set_metadata({"affine": affine, "original_affine": affine}, resample=False)
        files[cls] = tmp_path / f"{cls.__name__}{ext}"
        w.write(files[cls])
    ref, got = (nib.load(files[c]) for c in (NibabelWriter, AtomicNibabelWriter))
    assert got.header.binaryblock == ref.header.binaryblock
    np.testing.assert_array_equal(np.asanyarray(got.dataobj), np.asanyarray(ref.dataobj))
    assert got.get_data_dtype() == np.uint8
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f.name for f in files.values())  # no temporary left


def blobs(shape=(160, 150, 220), seed=2) -> np.ndarray:
    """A label map as a segmentation looks: mostly background, a few solid organ-like blobs."""
    rng = np.random.default_rng(seed)
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    label = np.zeros(shape, dtype=np.uint8)
    for k in range(1, 5):
        centre, radius = rng.uniform(0.25, 0.75, 3) * shape, rng.uniform(0.08, 0.2) * min(shape)
        label[sum((g - c) ** 2 for g, c in zip(grid, centre)) < radius**2] = k
    return label


def write_label(path, label, affine, **writer_kwargs):
    w = AtomicNibabelWriter(output_dtype=np.uint8, **writer_kwargs)
    w.set_data_array(torch.from_numpy(label), channel_dim=None)
    w.set_metadata({"affine": affine, "original_affine": affine}, resample=False)
    w.write(path)


def gzip_members(raw: bytes) -> int:
    members = 0
    while raw:
        d = zlib.decompressobj(31)
        d.decompress(raw)
        assert d.eof, "incomplete gzip member"
        raw, members = d.unused_data, members + 1
    return members


@pytest.mark.parametrize("threads", [None, 1, 2, 4])
def test_threaded_gzip_is_one_standard_member_that_nibabel_and_itk_read_back(tmp_path, threads):
    label = blobs()  # 5 MiB: five compression blocks
    path = tmp_path / "seg.nii.gz"
    write_label(path, label, OBLIQUE, compress_threads=threads)
    assert gzip_members(path.read_bytes()) == 1
    back = nib.load(path)
    assert back.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), label)
    np.testing.assert_allclose(back.affine, OBLIQUE, atol=1e-6)
    # ITK reads it as it reads MONAI's own NibabelWriter output: same voxels, same geometry
    ref = tmp_path / "ref.nii.gz"
    w = NibabelWriter(output_dtype=np.uint8)
    w.set_data_array(torch.from_numpy(label), channel_dim=None)
    w.set_metadata({"affine": OBLIQUE, "original_affine": OBLIQUE}, resample=False)
    w.write(ref)
    got, want = itk.imread(str(path)), itk.imread(str(ref))
    np.testing.assert_array_equal(itk.array_view_from_image(got), label.T)
    for attr in ("GetOrigin", "GetSpacing"):
        np.testing.assert_allclose(np.array(getattr(got, attr)()), np.array(getattr(want, attr)()))
    np.testing.assert_allclose(itk.array_from_matrix(got.GetDirection()), itk.array_from_matrix(want.GetDirection()))


def test_without_isal_the_standard_library_writes_one_member(tmp_path, monkeypatch):
    monkeypatch.setattr(msa2net.io, "_gzip", None)
    label = blobs()
    path = tmp_path / "seg.nii.gz"
    write_label(path, label, OBLIQUE)
    assert gzip_members(path.read_bytes()) == 1
    np.testing.assert_array_equal(np.asanyarray(nib.load(path).dataobj), label)


def test_threaded_gzip_reads_back_in_simpleitk(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    label = blobs()
    path = tmp_path / "seg.nii.gz"
    write_label(path, label, np.diag([-0.7, -0.7, 2.5, 1.0]), compress_threads=4)
    img = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), label.T)
    np.testing.assert_allclose(img.GetSpacing(), (0.7, 0.7, 2.5), rtol=1e-6)


@pytest.mark.parametrize("threads", [1, 4])
def test_a_write_that_fails_midway_leaves_no_file(tmp_path, threads):
    label = blobs(seed=3)
    label[::7] = np.arange(label[::7].size, dtype=np.uint64).reshape(label[::7].shape) % 251  # hard to compress
    path = tmp_path / "seg.nii.gz"
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails, not the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, old_limit[1]))  # as a full disk: writes past 256 KiB fail
    try:
        with pytest.raises(OSError, match="too large"):
            write_label(path, label, np.eye(4), compress_threads=threads)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert list(tmp_path.iterdir()) == []


def test_reverse_axes_is_a_transpose_for_every_rank_and_type():
    for shape in [(5,), (7, 3), (4, 5, 6), (3, 1, 4, 2)]:
        for dtype in (torch.uint8, torch.int16, torch.float32):
            t = torch.arange(int(np.prod(shape))).reshape(shape).to(dtype)
            got = msa2net.io.reverse_axes(t)
            assert got.is_contiguous() and torch.equal(got, t.permute(*reversed(range(t.ndim))))
