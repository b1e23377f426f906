"""Opening volumes from disk with their voxel size and offset; content identity."""


import numpy as np
import pytest
import tifffile
import zarr

from napari_dinofuse.errors import GeometryError
from napari_dinofuse.io import VolumeReadError, content_hash, open_volume


def test_npy_is_memory_mapped_not_loaded(tmp_path):
    np.save(tmp_path / "raw.npy", np.arange(4 * 8 * 8, dtype=np.uint16).reshape(4, 8, 8))
    volume = open_volume(tmp_path / "raw.npy", voxel_size=(8, 4, 4))
    assert isinstance(volume.data, np.memmap)
    assert volume.voxel_size == (8.0, 4.0, 4.0) and volume.offset == (0.0, 0.0, 0.0)


def _write_ome_zarr(path, levels, scale_um, translation_um):
    group = zarr.open_group(str(path), mode="w")
    datasets = []
    for i, data in enumerate(levels):
        group.create_array(str(i), data=data)
        factor = [1, 2**i, 2**i]
        datasets.append({"path": str(i), "coordinateTransformations": [
            {"type": "scale", "scale": [s * f for s, f in zip(scale_um, factor)]},
            {"type": "translation", "translation": translation_um}]})
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"],
        "datasets": datasets}]}


def test_ome_zarr_levels_carry_voxel_size_and_offset_in_nm(tmp_path):
    full = np.random.default_rng(0).integers(0, 255, (4, 16, 16), dtype=np.uint8)
    _write_ome_zarr(tmp_path / "em.zarr", [full, full[:, ::2, ::2]], [0.008, 0.004, 0.004], [1.0, 2.0, 3.0])
    level0 = open_volume(tmp_path / "em.zarr")
    assert np.allclose(level0.voxel_size, (8, 4, 4)) and np.allclose(level0.offset, (1000, 2000, 3000))
    assert isinstance(level0.data, zarr.Array)  # read lazily
    level1 = open_volume(tmp_path / "em.zarr", level=1)
    assert level1.shape == (4, 8, 8) and np.allclose(level1.voxel_size, (8, 8, 8))
    overridden = open_volume(tmp_path / "em.zarr", voxel_size=(10, 5, 5), offset=(0, 0, 0))
    assert overridden.voxel_size == (10.0, 5.0, 5.0) and overridden.offset == (0.0, 0.0, 0.0)
    with pytest.raises(VolumeReadError, match="level 5 does not exist"):
        open_volume(tmp_path / "em.zarr", level=5)


def test_plain_zarr_array_and_group_without_metadata(tmp_path):
    zarr.create_array(str(tmp_path / "plain.zarr"), data=np.zeros((3, 8, 8), np.uint8))
    assert open_volume(tmp_path / "plain.zarr", voxel_size=4).shape == (3, 8, 8)
    group = zarr.open_group(str(tmp_path / "group.zarr"), mode="w")
    group.create_array("raw", data=np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(VolumeReadError, match="group.zarr/raw"):
        open_volume(tmp_path / "group.zarr", voxel_size=4)


def test_imagej_tiff_voxel_size(tmp_path):
    data = np.zeros((5, 12, 10), np.uint8)
    tifffile.imwrite(tmp_path / "stack.tif", data, imagej=True, resolution=(1 / 0.004, 1 / 0.005),
                     metadata={"spacing": 0.008, "unit": "um", "axes": "ZYX"})
    volume = open_volume(tmp_path / "stack.tif")
    assert volume.shape == (5, 12, 10)
    assert np.allclose(volume.voxel_size, (8, 5, 4))


def test_missing_voxel_size_names_the_flag(tmp_path):
    np.save(tmp_path / "ctx.npy", np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(GeometryError, match="--context-voxel-size"):
        open_volume(tmp_path / "ctx.npy", voxel_size_hint="--context-voxel-size Z,Y,X")


def test_unreadable_input_gives_one_clear_error(tmp_path):
    with pytest.raises(VolumeReadError, match="no such file"):
        open_volume(tmp_path / "missing.npy", voxel_size=4)
    (tmp_path / "broken.npy").write_bytes(b"not a numpy file at all")
    with pytest.raises(VolumeReadError, match="cannot be read"):
        open_volume(tmp_path / "broken.npy", voxel_size=4)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(VolumeReadError, match="unsupported format"):
        open_volume(tmp_path / "notes.txt", voxel_size=4)
    np.save(tmp_path / "flat.npy", np.zeros((8, 8), np.uint8))
    with pytest.raises(GeometryError, match="2D"):
        open_volume(tmp_path / "flat.npy", voxel_size=4)


def test_content_hash_sees_any_change_and_stays_bounded():
    data = np.random.default_rng(0).integers(0, 255, (40, 32, 32), dtype=np.uint8)
    edited = data.copy()
    edited[17, 3, 5] ^= 1
    assert content_hash(data) == content_hash(data.copy())
    assert content_hash(data) != content_hash(edited)
    assert content_hash(data) != content_hash(data.astype(np.uint16))
    # Past the limit only sampled slices are hashed (bounded time); slice 0 is always among them.
    sampled = data.copy()
    sampled[0, 0, 0] ^= 1
    assert content_hash(data, full_limit_bytes=1000) != content_hash(sampled, full_limit_bytes=1000)
