"""Opening volumes from disk with their voxel size and offset; content identity.

Files of other tools are made here by the reference writers (ome-zarr, tifffile, h5py) the way those tools
write them, and must land at the right place in nanometres.
"""


from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import zarr

from napari_dinofuse._napari.reader import get_reader
from napari_dinofuse.errors import GeometryError, VolumeReadError
from napari_dinofuse.io import content_hash, file_backing, open_volume, read_region, sample_digest


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
    # Read in whole storage chunks along z, hashed in the same ~2 MB parts: the same identity.
    big = np.random.default_rng(1).integers(0, 255, (40, 512, 512), dtype=np.uint8)
    assert content_hash(zarr.create_array({}, data=big, chunks=(12, 256, 256))) == content_hash(big)


def test_file_backing_names_every_file_an_array_is_read_from(tmp_path):
    import dask.array as da

    data = np.arange(4 * 6 * 8, dtype=np.uint8).reshape(4, 6, 8)
    v3 = zarr.create_array(str(tmp_path / "v3.zarr"), data=data, chunks=(1, 3, 8))
    where, files = file_backing(zarr.open_array(str(tmp_path / "v3.zarr"), mode="r"))
    files = [Path(f) for f in files]
    assert where == f"zarr {(tmp_path / 'v3.zarr').resolve()}"
    assert [f.relative_to(tmp_path / "v3.zarr").as_posix() for f in files[3:]] == [
        f"c/{z}/{y}/0" for z in range(4) for y in range(2)]  # after zarr.json, .zarray, .zattrs
    assert all(f.is_file() for f in files[3:])
    sharded = zarr.create_array(str(tmp_path / "sharded.zarr"), data=data, chunks=(1, 3, 8), shards=(2, 6, 8))
    assert len(file_backing(sharded)[1]) == 3 + 2  # one file per shard
    v2 = zarr.create_array(str(tmp_path / "v2.zarr"), data=data, chunks=(2, 6, 8), zarr_format=2)
    v2_files = [Path(f) for f in file_backing(v2)[1]]
    assert sorted(f.name for f in v2_files if f.is_file()) == [".zarray", ".zattrs", "0.0.0", "1.0.0"]
    np.save(tmp_path / "raw.npy", data)
    mapped = np.load(tmp_path / "raw.npy", mmap_mode="r")
    assert file_backing(mapped)[1] == [str((tmp_path / "raw.npy").resolve())]
    with h5py.File(tmp_path / "raw.h5", "w") as f:
        f["raw"] = data
    h5_files = file_backing(open_volume(tmp_path / "raw.h5", voxel_size=1).data)[1]
    assert h5_files == [str((tmp_path / "raw.h5").resolve())]
    # Arrays whose content can change without their files' times changing are identified by content alone.
    writable = np.load(tmp_path / "raw.npy", mmap_mode="r+")
    for array in (data, mapped[1:], writable, da.from_zarr(v3), zarr.create_array({}, data=data)):
        assert file_backing(array) is None


def test_sample_digest_of_a_zarr_folder_hashes_the_stored_chunks(tmp_path):
    """A cache hit's content check reads a few chunk files as stored (no decoding): the same data in another
    folder hashes the same, an edit of a sampled chunk or a chunk left unstored (all fill value) does not."""
    data = np.random.default_rng(0).integers(1, 255, (40, 32, 32), dtype=np.uint8)
    first = zarr.create_array(str(tmp_path / "a.zarr"), data=data, chunks=(4, 16, 16))
    second = zarr.create_array(str(tmp_path / "b.zarr"), data=data, chunks=(4, 16, 16))
    assert sample_digest(first) == sample_digest(second)
    first[39, 31, 31] = 0  # the last chunk is always sampled
    assert sample_digest(first) != sample_digest(second)
    second[36:40, 16:32, 16:32] = 0  # the fill value: zarr stores no file for it
    assert not (tmp_path / "b.zarr" / "c" / "9" / "1" / "1").exists()
    assert sample_digest(second) != sample_digest(first)


def test_sample_digest_reads_a_few_whole_chunks():
    data = np.random.default_rng(0).integers(0, 255, (40, 32, 32), dtype=np.uint8)
    edited = data.copy()
    edited[39, 31, 31] ^= 1  # the last chunk is always sampled
    assert sample_digest(data) == sample_digest(data.copy()) != sample_digest(edited)
    reads = []

    class Counted:  # a chunked array that records what is read
        shape, dtype, chunks = data.shape, data.dtype, (4, 16, 16)

        def __getitem__(self, region):
            reads.append(data[region].size)
            return data[region]

    sample_digest(Counted(), count=5)
    assert reads == [4 * 16 * 16] * 5


# --- OME-Zarr by the ome-zarr library ----------------------------------------------------------------------------

NM_PER = {"micrometer": 1e3, "nanometer": 1.0, "angstrom": 0.1}
# ome-zarr deprecates its own defaults and the explicit transforms (the only way it writes a translation).
ome_zarr_warnings = pytest.mark.filterwarnings("ignore:.*(Scaler|coordinate_transformations).*:DeprecationWarning",
                                              "ignore:Scale value not provided:UserWarning")


def _tczyx(shape=(4, 16, 16)):
    return np.random.default_rng(1).integers(0, 255, (1, 1, *shape), dtype=np.uint8)


@ome_zarr_warnings
@pytest.mark.parametrize("version", ["0.4", "0.5"])
@pytest.mark.parametrize("unit", list(NM_PER))
def test_ome_zarr_of_the_reference_writer_lands_in_nm(tmp_path, version, unit):
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_multiscale

    fmt = FormatV04() if version == "0.4" else FormatV05()
    image = _tczyx()
    to_unit = 1 / NM_PER[unit]
    # Level 1 halves y, x: its voxels are 8 nm and its first centre lies between level 0's first two (+2 nm).
    transforms = [[{"type": "scale", "scale": [1, 1, *(np.array(vs) * to_unit)]},
                   {"type": "translation", "translation": [0, 0, *(np.array(off) * to_unit)]}]
                  for vs, off in (((8, 4, 4), (1000, 2000, 3000)), ((8, 8, 8), (1000, 2002, 3002)))]
    group = zarr.open_group(str(tmp_path / "em.zarr"), mode="w", zarr_format=fmt.zarr_format)
    write_multiscale([image, image[..., ::2, ::2]], group, fmt=fmt, coordinate_transformations=transforms,
                     axes=[{"name": "t", "type": "time"}, {"name": "c", "type": "channel"},
                           *({"name": a, "type": "space", "unit": unit} for a in "zyx")])
    assert (tmp_path / "em.zarr" / ("zarr.json" if version == "0.5" else ".zattrs")).exists()  # the form asked for

    level0 = open_volume(tmp_path / "em.zarr")
    assert level0.shape == (4, 16, 16)  # t and c dropped
    assert np.allclose(level0.voxel_size, (8, 4, 4)) and np.allclose(level0.offset, (1000, 2000, 3000))
    assert not isinstance(level0.data, np.ndarray)  # dropping t and c did not load the volume
    assert np.array_equal(read_region(level0.data, (slice(1, 3), slice(None), 5)), image[0, 0, 1:3, :, 5])
    level1 = open_volume(tmp_path / "em.zarr", level=1)
    assert level1.shape == (4, 8, 8) and np.allclose(level1.voxel_size, (8, 8, 8))
    # Overlaid in napari, the levels coincide: level 1's first voxel is centred on level 0's first 2x2 block.
    assert np.allclose(level1.grid.index_to_world((0, 0, 0)), level0.grid.index_to_world((0, 0.5, 0.5)))
    assert np.array_equal(read_region(level1.data, (slice(None),) * 3), image[0, 0, :, ::2, ::2])


@ome_zarr_warnings
@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_pyramid_made_by_the_reference_writer(tmp_path, version):
    """write_image builds the pyramid and its per-level translations itself; the reader's layer follows them."""
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_image

    fmt = FormatV04() if version == "0.4" else FormatV05()
    group = zarr.open_group(str(tmp_path / "em.zarr"), mode="w", zarr_format=fmt.zarr_format)
    write_image(_tczyx(), group, fmt=fmt, axes="tczyx", scale_factors=[2], scale={"z": 80, "y": 40, "x": 40},
                axes_units={a: "angstrom" for a in "zyx"})
    level1 = open_volume(tmp_path / "em.zarr", level=1)
    assert np.allclose(level1.voxel_size, (8, 8, 8)) and np.allclose(level1.offset, (0, 2, 2))
    [(data, kwargs, kind)] = get_reader(str(tmp_path / "em.zarr"))(str(tmp_path / "em.zarr"))
    assert kind == "image" and data.shape == (4, 16, 16)
    assert np.allclose(kwargs["scale"], (8, 4, 4)) and np.allclose(kwargs["translate"], (0, 0, 0))


def test_ome_zarr_multiscale_transform_applies_after_the_level(tmp_path):
    full = np.zeros((4, 16, 16), np.uint8)
    _write_ome_zarr(tmp_path / "em.zarr", [full, full[:, ::2, ::2]], [1, 1, 1], [0.5, 0.5, 0.5])
    group = zarr.open_group(str(tmp_path / "em.zarr"), mode="r+")
    ome = group.attrs["ome"]
    ome["multiscales"][0]["coordinateTransformations"] = [{"type": "scale", "scale": [0.008, 0.004, 0.004]},
                                                          {"type": "translation", "translation": [1, 1, 1]}]
    group.attrs["ome"] = ome
    volume = open_volume(tmp_path / "em.zarr", level=1)
    assert np.allclose(volume.voxel_size, (8, 8, 8))
    assert np.allclose(volume.offset, (1004, 1002, 1002))  # (0.5 * level scale) * image scale + image offset


# --- TIFF by tifffile, as ImageJ/Fiji and OME write it -----------------------------------------------------------

@pytest.mark.parametrize("unit", ["um", "micron", "\\u00B5m"])  # Fiji writes µm as the escaped text \u00B5m
def test_imagej_hyperstack_units(tmp_path, unit):
    data = np.arange(5 * 12 * 10, dtype=np.uint16).reshape(1, 5, 1, 12, 10)
    tifffile.imwrite(tmp_path / "stack.tif", data, imagej=True, resolution=(1 / 0.004, 1 / 0.005),
                     metadata={"axes": "TZCYX", "spacing": 0.008, "unit": unit})
    volume = open_volume(tmp_path / "stack.tif")
    assert volume.shape == (5, 12, 10) and np.allclose(volume.voxel_size, (8, 5, 4))
    assert np.array_equal(read_region(volume.data, 3), data[0, 3, 0])


@pytest.mark.parametrize("sizes, unit", [((0.008, 0.005, 0.004), None), ((0.008, 0.005, 0.004), "µm"),
                                         ((8, 5, 4), "nm"), ((80, 50, 40), "Å")])
def test_ome_tiff_physical_sizes(tmp_path, sizes, unit):
    meta = {"axes": "TCZYX", **{f"PhysicalSize{a}": s for a, s in zip("ZYX", sizes)}}
    if unit:  # without one, OME's default is µm
        meta.update({f"PhysicalSize{a}Unit": unit for a in "ZYX"})
    tifffile.imwrite(tmp_path / "em.ome.tif", np.zeros((1, 1, 5, 12, 10), np.uint16), metadata=meta)
    volume = open_volume(tmp_path / "em.ome.tif")
    assert volume.shape == (5, 12, 10) and np.allclose(volume.voxel_size, (8, 5, 4))
    [(_, kwargs, _)] = get_reader(str(tmp_path / "em.ome.tif"))(str(tmp_path / "em.ome.tif"))
    assert np.allclose(kwargs["scale"], (8, 5, 4))


def test_ome_tiff_unknown_unit_is_refused_not_guessed(tmp_path):
    tifffile.imwrite(tmp_path / "em.ome.tif", np.zeros((5, 12, 10), np.uint16), metadata={
        "axes": "ZYX", **{f"PhysicalSize{a}": 1.0 for a in "ZYX"}, **{f"PhysicalSize{a}Unit": "pc" for a in "ZYX"}})
    with pytest.raises(VolumeReadError, match="unknown length unit 'pc'"):
        open_volume(tmp_path / "em.ome.tif")


# --- HDF5 by h5py, as CREMI and ilastik/Fiji write it ------------------------------------------------------------

def _cremi(path):
    raw = np.random.default_rng(2).integers(0, 255, (6, 24, 20), dtype=np.uint8)
    with h5py.File(path, "w") as f:
        dataset = f.create_dataset("volumes/raw", data=raw, chunks=(1, 12, 10), compression="gzip")
        dataset.attrs["resolution"] = [40.0, 4.0, 4.0]
        dataset.attrs["offset"] = [80.0, 8.0, 12.0]
        f.create_dataset("volumes/labels/neuron_ids", data=np.zeros(raw.shape, np.uint64))
        f.create_dataset("annotations/locations", data=np.zeros((3, 3)))
    return raw


def test_cremi_hdf5_dataset_opens_lazily_in_place(tmp_path):
    raw = _cremi(tmp_path / "sample_A.h5")
    volume = open_volume(tmp_path / "sample_A.h5/volumes/raw")
    assert volume.name == "raw" and volume.shape == raw.shape
    assert np.allclose(volume.voxel_size, (40, 4, 4)) and np.allclose(volume.offset, (80, 8, 12))
    assert isinstance(volume.data, h5py.Dataset)  # read on demand, not loaded
    assert np.array_equal(read_region(volume.data, (slice(2, 4), slice(5, 30), 7)), raw[2:4, 5:, 7])
    # The same voxels give the same cache identity whatever holds them (whole and sampled hashing).
    assert content_hash(volume.data) == content_hash(raw)
    assert content_hash(volume.data, full_limit_bytes=100) == content_hash(raw, full_limit_bytes=100)
    path = str(tmp_path / "sample_A.h5/volumes/raw")
    [(data, kwargs, kind)] = get_reader(path)(path)
    assert kind == "image" and kwargs["name"] == "raw"
    assert np.allclose(kwargs["scale"], (40, 4, 4)) and np.allclose(kwargs["translate"], (80, 8, 12))
    # The file itself (what napari hands over): one layer per volume, each placed by its own attributes.
    layers = get_reader(str(tmp_path / "sample_A.h5"))(str(tmp_path / "sample_A.h5"))
    assert [kwargs["name"] for _, kwargs, _ in layers] == ["neuron_ids", "raw"]
    assert np.allclose(layers[1][1]["translate"], (80, 8, 12)) and layers[0][1]["scale"] == (1.0, 1.0, 1.0)


def test_ilastik_hdf5_with_one_volume_opens_from_the_file(tmp_path):
    data = np.random.default_rng(3).random((1, 5, 12, 10), dtype=np.float32)  # czyx, one channel
    with h5py.File(tmp_path / "export.hdf5", "w") as f:
        f.create_dataset("exported_data", data=data).attrs["element_size_um"] = [0.008, 0.004, 0.004]
    volume = open_volume(tmp_path / "export.hdf5")
    assert volume.shape == (5, 12, 10) and np.allclose(volume.voxel_size, (8, 4, 4))
    assert volume.offset == (0.0, 0.0, 0.0)
    assert not isinstance(volume.data, np.ndarray)  # the channel was dropped without loading
    assert np.array_equal(read_region(volume.data, (slice(None),) * 3), data[0])
    assert get_reader(str(tmp_path / "export.hdf5")) is not None


def test_hdf5_bad_input_gives_one_clear_line(tmp_path):
    _cremi(tmp_path / "em.h5")
    with pytest.raises(VolumeReadError, match=r"holds 2 volumes: open one as .*em.h5/PATH .*em.h5/volumes/raw"):
        open_volume(tmp_path / "em.h5")
    with pytest.raises(VolumeReadError, match=r"has no dataset 'volumes/rwa' \(its datasets: .*volumes/raw"):
        open_volume(tmp_path / "em.h5/volumes/rwa")
    with pytest.raises(VolumeReadError, match=r"em.h5/volumes is a group: open one of its datasets .*volumes/raw"):
        open_volume(tmp_path / "em.h5/volumes")
    with pytest.raises(VolumeReadError, match="no such file"):
        open_volume(tmp_path / "other.h5/volumes/raw")
    (tmp_path / "fake.h5").write_text("not HDF5")
    with pytest.raises(VolumeReadError, match="fake.h5 is not an HDF5 file"):
        open_volume(tmp_path / "fake.h5/raw")
    with h5py.File(tmp_path / "flat.h5", "w") as f:
        f.create_dataset("image", data=np.zeros((8, 8), np.uint8))
    with pytest.raises(VolumeReadError, match=r"holds no 3D dataset \(its datasets: .*flat.h5/image \(8, 8\)"):
        open_volume(tmp_path / "flat.h5", voxel_size=4)
    with pytest.raises(GeometryError, match="image is 2D"):  # as for every other format
        open_volume(tmp_path / "flat.h5/image", voxel_size=4)
    for path in ("em.h5/volumes/raw", "em.hdf5", "EM.H5"):
        assert get_reader(str(tmp_path / path)) is not None
    assert get_reader(str(tmp_path / "notes.txt")) is None
