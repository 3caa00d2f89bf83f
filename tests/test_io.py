"""The fast NIfTI reader and writer give exactly what MONAI's NibabelReader and NibabelWriter give."""

import gzip

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
    got = LoadImage(reader=FastNibabelReader, image_only=True)(path)
    assert got.dtype == ref.dtype == torch.float32
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
