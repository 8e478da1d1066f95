"""Image checks and array operations of brainage_bids.utils.images on small synthetic volumes."""
from __future__ import annotations

import gzip
import logging
import os

import nibabel as nib
import numpy as np
import pytest

from brainage_bids.utils.images import (
    InputImageError,
    atomic_copy,
    atomic_write_bytes,
    atomic_write_text,
    check_mask,
    load_image,
    mask_correlation,
    normalise_mean_in_mask,
    reorient_ras,
    resample_to_grid,
)


def _volume(shape=(12, 14, 10), seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(1.0, 100.0, size=shape).astype(np.float32)


def _save(img, path):
    nib.save(img, str(path))
    return path


# --- load_image -------------------------------------------------------------------------------

def test_load_valid_image(tmp_path):
    data = _volume()
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    path = _save(nib.Nifti1Image(data, affine), tmp_path / "ok.nii.gz")
    img = load_image(path)
    assert img.shape == data.shape
    assert img.get_data_dtype() == np.float32
    np.testing.assert_allclose(img.affine, affine)
    np.testing.assert_array_equal(np.asarray(img.dataobj), data)


def test_corrupt_file(tmp_path):
    path = tmp_path / "sub-01_T1w.nii.gz"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(InputImageError) as exc:
        load_image(path)
    assert str(path) in str(exc.value)


def test_truncated_gzip(tmp_path):
    full = _save(nib.Nifti1Image(_volume((40, 40, 40)), np.eye(4)), tmp_path / "full.nii.gz")
    payload = full.read_bytes()
    path = tmp_path / "sub-01_T1w.nii.gz"
    path.write_bytes(payload[: len(payload) // 2])
    # the header still reads: only the data are missing
    assert nib.load(str(path)).shape == (40, 40, 40)
    with pytest.raises(InputImageError) as exc:
        load_image(path)
    assert str(path) in str(exc.value)


def test_truncated_uncompressed(tmp_path):
    full = _save(nib.Nifti1Image(_volume((20, 20, 20)), np.eye(4)), tmp_path / "full.nii")
    payload = full.read_bytes()
    path = tmp_path / "cut.nii"
    path.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(InputImageError) as exc:
        load_image(path)
    assert str(path) in str(exc.value)


def test_4d_series_rejected(tmp_path):
    path = _save(nib.Nifti1Image(_volume((8, 9, 7, 3)), np.eye(4)), tmp_path / "bold.nii.gz")
    with pytest.raises(InputImageError) as exc:
        load_image(path)
    msg = str(exc.value)
    assert str(path) in msg
    assert "3 volumes" in msg


def test_4d_singleton_accepted(tmp_path):
    data = _volume((8, 9, 7, 1))
    path = _save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "single.nii.gz")
    img = load_image(path)
    assert img.shape == (8, 9, 7)
    np.testing.assert_array_equal(np.asarray(img.dataobj), data[..., 0])


def test_constant_image_rejected(tmp_path):
    path = _save(nib.Nifti1Image(np.full((8, 8, 8), 7, np.float32), np.eye(4)), tmp_path / "c.nii.gz")
    with pytest.raises(InputImageError) as exc:
        load_image(path)
    assert str(path) in str(exc.value)


def test_all_zero_image_rejected(tmp_path):
    path = _save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), tmp_path / "z.nii.gz")
    with pytest.raises(InputImageError, match="constant"):
        load_image(path)


def test_singular_affine_rejected(tmp_path):
    # nibabel refuses to save a singular affine, so write the header and data by hand (.nii)
    data = _volume((5, 6, 7))
    hdr = nib.Nifti1Image(data, np.eye(4)).header
    hdr["srow_z"] = [0, 0, 0, 0]
    hdr.set_qform(None, code=0)
    hdr["sform_code"] = 1
    hdr["vox_offset"] = 352
    path = tmp_path / "flat.nii"
    block = hdr.binaryblock
    path.write_bytes(block + b"\0" * (352 - len(block)) + data.tobytes(order="F"))
    assert abs(np.linalg.det(nib.load(str(path)).affine[:3, :3])) < 1e-6
    with pytest.raises(InputImageError) as exc:
        load_image(path)
    assert str(path) in str(exc.value)


def test_few_nans_are_zeroed_many_rejected(tmp_path):
    data = _volume((10, 10, 10))
    data[0, 0, 0] = np.nan
    img = load_image(_save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "few.nii.gz"))
    out = np.asarray(img.dataobj)
    assert np.isfinite(out).all() and out[0, 0, 0] == 0
    data[:5] = np.nan
    path = _save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "many.nii.gz")
    with pytest.raises(InputImageError) as exc:
        load_image(path)
    assert str(path) in str(exc.value)


# --- reorientation ----------------------------------------------------------------------------

def _world_of_marker(img, value):
    data = np.asarray(img.dataobj)
    ijk = np.argwhere(data == value)
    assert len(ijk) == 1
    return nib.affines.apply_affine(img.affine, ijk[0])


@pytest.mark.parametrize("affine", [
    # LPS: x and y axes flipped
    np.array([[-2.0, 0, 0, 30], [0, -1.5, 0, 40], [0, 0, 1.2, -20], [0, 0, 0, 1]]),
    # PSR: voxel axes are (posterior, superior, right)
    np.array([[0, 0, 1.0, -50], [-2.0, 0, 0, 60], [0, 1.5, 0, -30], [0, 0, 0, 1]]),
])
def test_reorient_ras(affine):
    data = _volume((9, 11, 13))
    marker = 1000.0
    data[2, 7, 4] = marker
    img = nib.Nifti1Image(data, affine)
    assert nib.aff2axcodes(img.affine) != ("R", "A", "S")
    out = reorient_ras(img)
    assert nib.aff2axcodes(out.affine) == ("R", "A", "S")
    np.testing.assert_allclose(_world_of_marker(out, marker), _world_of_marker(img, marker))
    assert sorted(out.shape) == sorted(img.shape)


# --- normalisation, masks ---------------------------------------------------------------------

def test_normalise_mean_in_mask():
    data = _volume((10, 10, 10), seed=3)
    mask = np.zeros(data.shape, bool)
    mask[2:8, 3:7, 1:9] = True
    out = normalise_mean_in_mask(data, mask.astype(np.uint8))
    assert out.dtype == np.float32
    assert out[mask].mean() == pytest.approx(1.0, abs=1e-5)
    assert np.all(out[~mask] == 0)
    np.testing.assert_allclose(out[mask], data[mask] / data[mask].mean(), rtol=1e-5)


def test_normalise_rejects_empty_or_nonpositive_mask():
    data = _volume((6, 6, 6))
    with pytest.raises(InputImageError):
        normalise_mean_in_mask(data, np.zeros(data.shape))
    with pytest.raises(InputImageError):
        normalise_mean_in_mask(-data, np.ones(data.shape))


def test_check_mask():
    mask = np.zeros((20, 20, 20), bool)
    with pytest.raises(InputImageError) as exc:
        check_mask(mask, "/data/sub-01_T1w.nii.gz")
    assert "/data/sub-01_T1w.nii.gz" in str(exc.value)
    mask[5:15, 5:15, 5:15] = True  # 1000 voxels of 1 mm^3 = 1 mL
    check_mask(mask, "src")
    with pytest.raises(InputImageError):
        check_mask(mask, "src", min_ml=2.0)
    check_mask(mask, "src", min_ml=2.0, voxel_ml=8e-3)  # 2 mm voxels: 8 mL


def test_mask_correlation():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(8, 8, 8))
    mask = np.ones(a.shape)
    assert mask_correlation(a, 3 * a + 2, mask) == pytest.approx(1.0)
    assert mask_correlation(a, -a, mask) == pytest.approx(-1.0)
    assert mask_correlation(a, np.ones_like(a), mask) == 0.0


# --- resampling -------------------------------------------------------------------------------

def test_resample_onto_own_grid_is_identity():
    data = _volume((12, 10, 14), seed=7)
    affine = np.array([[2.0, 0, 0, -10], [0, 2.0, 0, 5], [0, 0, 2.0, 3], [0, 0, 0, 1]])
    out = resample_to_grid(nib.Nifti1Image(data, affine), affine, data.shape, order=1)
    np.testing.assert_allclose(out, data, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("order", [0, 1])
def test_resample_known_translation(order):
    data = np.zeros((20, 20, 20), np.float32)
    data[10, 6, 12] = 50.0
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-20, -20, -20]
    shift = np.array([4.0, -6.0, 2.0])  # mm: the target grid is moved by this in world space
    target = affine.copy()
    target[:3, 3] += shift
    out = resample_to_grid(nib.Nifti1Image(data, affine), target, data.shape, order=order)
    # target voxel u is at world target @ u = affine @ u + shift, so the marker moves by -shift/2
    expected = np.array([10, 6, 12]) - shift / 2.0
    assert tuple(np.argwhere(out == out.max())[0]) == tuple(expected.astype(int))
    assert out.max() == pytest.approx(50.0)
    np.testing.assert_allclose(
        nib.affines.apply_affine(target, expected), nib.affines.apply_affine(affine, [10, 6, 12]))


def test_resample_to_coarser_grid_preserves_mean():
    data = _volume((32, 32, 32), seed=11)
    affine = np.eye(4)
    target = np.diag([2.0, 2.0, 2.0, 1.0])
    target[:3, 3] = 0.5  # centres of 2x2x2 blocks of the source
    out = resample_to_grid(nib.Nifti1Image(data, affine), target, (16, 16, 16))
    assert out.shape == (16, 16, 16)
    inner = out[2:-2, 2:-2, 2:-2]
    assert inner.mean() == pytest.approx(data[4:-4, 4:-4, 4:-4].mean(), rel=0.02)
    assert inner.std() < data.std()  # anti-aliasing smoothed it


# --- atomic writes ----------------------------------------------------------------------------

def test_atomic_writes_leave_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "dir" / "file.json"
    atomic_write_text(target, '{"a": 1}\n')
    assert target.read_text() == '{"a": 1}\n'
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    atomic_copy(target, tmp_path / "copy.bin")
    assert (tmp_path / "copy.bin").read_bytes() == b"second"
    assert sorted(os.listdir(target.parent)) == ["file.json"]
    assert sorted(os.listdir(tmp_path)) == ["copy.bin", "sub"]


def test_failed_atomic_write_keeps_old_file_and_no_temp(tmp_path):
    target = tmp_path / "table.tsv"
    target.write_text("old\n")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # the write fails after the temp file exists
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["table.tsv"]


def test_gzip_payload_is_valid_nifti(tmp_path):
    img = nib.Nifti1Image(_volume((5, 6, 7)), np.eye(4))
    target = tmp_path / "x.nii.gz"
    atomic_write_bytes(target, gzip.compress(img.to_bytes()))
    np.testing.assert_array_equal(np.asarray(load_image(target).dataobj), np.asarray(img.dataobj))


# --- range, sign, field of view, header consistency (issue 16) ----------------------------------

def test_float64_values_overflowing_float32(tmp_path):
    """Finite float64 values whose sums leave float32 (x1e30) or that exceed it (1e39) are
    refused as overflowing, not called NaN or infinite."""
    data = _volume((20, 20, 20)).astype(np.float64)
    for scale in (1e30, 1e37):
        path = _save(nib.Nifti1Image(data * scale, np.eye(4)), tmp_path / f"big{scale:g}.nii.gz")
        assert np.asanyarray(nib.load(str(path)).dataobj).dtype == np.float64
        with pytest.raises(InputImageError, match="values overflow float32") as exc:
            load_image(path)
        assert str(path) in str(exc.value) and "NaN" not in str(exc.value)
    load_image(_save(nib.Nifti1Image(data * 1e6, np.eye(4)), tmp_path / "ok.nii.gz"))


def test_negative_image_reported(tmp_path):
    data = _volume((10, 10, 10))
    for name, values in (("neg", -data), ("shifted", data - 150.0)):
        path = _save(nib.Nifti1Image(values, np.eye(4)), tmp_path / f"{name}.nii.gz")
        with pytest.raises(InputImageError, match="a magnitude MRI image is >= 0") as exc:
            load_image(path)
        assert str(path) in str(exc.value)
    # a little negative background noise is fine
    noisy = data.copy()
    noisy[:2] = np.random.default_rng(1).normal(0, 5, noisy[:2].shape)
    load_image(_save(nib.Nifti1Image(noisy, np.eye(4)), tmp_path / "noisy.nii.gz"))


def test_field_of_view_too_small_for_a_brain(tmp_path):
    from brainage_bids.utils.images import check_field_of_view

    crop = nib.Nifti1Image(_volume((20, 20, 20)), np.diag([2.0, 2.0, 2.0, 1.0]))
    with pytest.raises(InputImageError, match=r"field of view \(40 x 40 x 40 mm\) is too small"):
        check_field_of_view(crop, "/data/sub-01_T1w.nii.gz")
    check_field_of_view(nib.Nifti1Image(_volume((91, 109, 91)), np.diag([2.0, 2.0, 2.0, 1.0])),
                        "ok")
    # a 2D acquisition: 24 slices of 5 mm cover 120 mm
    check_field_of_view(nib.Nifti1Image(_volume((256, 256, 24)), np.diag([0.9, 0.9, 5.0, 1.0])),
                        "ok")


def test_validate_image_refuses_small_field_of_view(tmp_path):
    from brainage_bids.interfaces.bids import ValidateImage

    path = _save(nib.Nifti1Image(_volume((20, 20, 20)), np.diag([2.0, 2.0, 2.0, 1.0])),
                 tmp_path / "sub-01_T1w.nii.gz")
    node = ValidateImage(in_file=str(path))
    with pytest.raises(InputImageError, match="too small to hold a brain"):
        node.run(cwd=str(tmp_path))


def test_implausibly_small_mask():
    from brainage_bids.utils.images import MIN_BRAIN_ML

    mask = np.zeros((40, 40, 40), bool)
    mask[:20, :20, :20] = True  # 8000 voxels of 2 mm: 64 mL
    with pytest.raises(InputImageError, match="implausibly small") as exc:
        check_mask(mask, "/data/sub-01_T1w.nii.gz", min_ml=MIN_BRAIN_ML, voxel_ml=8e-3)
    assert "64.00 mL" in str(exc.value)
    mask[:] = True  # 512 mL
    check_mask(mask, "src", min_ml=MIN_BRAIN_ML, voxel_ml=8e-3)


def test_skull_strip_refuses_a_small_mask(tmp_path):
    from brainage_bids.interfaces.skullstrip import skull_strip

    data = np.zeros((60, 60, 60), np.float32)
    data[20:40, 20:40, 20:40] = 100.0  # a 4 cm cube: 64 mL
    path = _save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / "cube.nii.gz")
    with pytest.raises(InputImageError, match="implausibly small"):
        skull_strip(str(path), str(tmp_path / "b.nii.gz"), str(tmp_path / "m.nii.gz"),
                    method="none", source_file="sub-01_T1w.nii.gz")


def test_nan_voxels_set_to_zero_are_reported(tmp_path, caplog):
    data = _volume((10, 10, 10))
    data[0, 0, :3] = np.nan
    path = _save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "few.nii.gz")
    with caplog.at_level(logging.WARNING, logger="brainage_bids.images"):
        load_image(path)
    assert f"{path}: 3 NaN or infinite voxel(s) set to 0" in caplog.text


def test_qform_sform_disagreement_is_reported(tmp_path, caplog):
    from brainage_bids.utils.images import rotation

    img = nib.Nifti1Image(_volume((20, 20, 20)), np.eye(4))
    img.set_sform(np.eye(4), code=1)
    img.set_qform(rotation((90.0, 0.0, 0.0)), code=1)
    path = _save(img, tmp_path / "disagree.nii.gz")
    with caplog.at_level(logging.WARNING, logger="brainage_bids.images"):
        load_image(path)
    assert f"{path}: the qform and sform disagree" in caplog.text
    caplog.clear()
    img.set_qform(np.eye(4), code=1)
    with caplog.at_level(logging.WARNING, logger="brainage_bids.images"):
        load_image(_save(img, tmp_path / "agree.nii.gz"))
    assert "disagree" not in caplog.text
