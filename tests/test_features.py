"""Chunked feature extraction into the resumable zarr cache (random tiny ViT: real code paths, fake weights)."""

import os
import tracemalloc

import dask.array as da
import numpy as np
import pytest

from napari_dinofuse.backbone import to_unit_range
from napari_dinofuse.cache import CacheError, FeatureCache, FeatureEntry
from napari_dinofuse.errors import DinofuseError
from napari_dinofuse.features import compute_features, extract_features, feature_grid
from napari_dinofuse.geometry import Volume


@pytest.fixture
def counting_backbone(tiny_backbone, monkeypatch):
    """The real tiny backbone, counting the slices it is asked to embed."""
    calls = {"slices": 0}
    original = tiny_backbone.patch_features

    def counted(images):
        calls["slices"] += images.shape[0]
        return original(images)

    monkeypatch.setattr(tiny_backbone, "patch_features", counted)
    tiny_backbone.calls = calls
    return tiny_backbone


def _cancel_after(run, slices: int) -> None:
    """What a Cancel button or Ctrl-C does: stop iterating between batches, then close the generator."""
    for progress in run:
        if progress.done >= slices:
            break
    run.close()


def _volume(shape=(6, 50, 70), seed=0, name="raw"):
    data = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    return Volume(data, voxel_size=(8.0, 4.0, 4.0), name=name)


def test_xy_features_are_the_backbone_patch_grid_in_fp16(tmp_path, tiny_backbone):
    volume = _volume()
    entry = compute_features(volume, tiny_backbone, FeatureCache(tmp_path))
    features = entry.read()
    assert features.shape == (64, 6, 4, 5) and features.dtype == np.float16  # ceil(50/16), ceil(70/16)
    direct = tiny_backbone.patch_features(to_unit_range(volume.data[3:4], 0, 255))[0].numpy()
    assert np.allclose(features[:, 3], direct, atol=2e-2, rtol=1e-2)
    grid = feature_grid(volume)
    assert grid.shape == features.shape[1:] and grid.voxel_size == (8.0, 64.0, 64.0)


def test_ortho_features_share_the_xy_grid_and_add_3d_context(tmp_path, tiny_backbone):
    volume = _volume(shape=(20, 40, 36))
    cache = FeatureCache(tmp_path)
    xy = compute_features(volume, tiny_backbone, cache).read().astype(np.float32)
    entry = compute_features(volume, tiny_backbone, cache, planes="ortho")
    ortho = entry.read().astype(np.float32)
    assert ortho.shape == xy.shape == (64, 20, 3, 3)
    assert np.isfinite(ortho).all()
    # The average of three plane families: correlated with, but not equal to, the xy features.
    assert np.abs(ortho - xy).mean() > 1e-3
    assert np.corrcoef(ortho.ravel(), xy.ravel())[0, 1] > 0.5


def test_tiled_slices_match_whole_slices(tmp_path, counting_backbone):
    volume = _volume(shape=(2, 150, 200))
    cache = FeatureCache(tmp_path)
    whole = compute_features(volume, counting_backbone, cache, tile_size=1024).read().astype(np.float32)
    assert counting_backbone.calls["slices"] == 2
    tiled = compute_features(volume, counting_backbone, cache, tile_size=96).read().astype(np.float32)
    assert counting_backbone.calls["slices"] > 2 + 2 * 4  # really tiled: several tiles per slice
    cosine = (whole * tiled).sum(0) / np.linalg.norm(whole, axis=0) / np.linalg.norm(tiled, axis=0)
    assert cosine.min() > 0.99
    assert np.abs(whole - tiled).mean() < 0.05 * np.abs(whole).mean()


def test_second_extraction_reuses_the_cache(tmp_path, counting_backbone):
    volume, cache = _volume(), FeatureCache(tmp_path)
    first = compute_features(volume, counting_backbone, cache)
    assert counting_backbone.calls["slices"] == 6
    second = compute_features(volume, counting_backbone, cache)
    assert counting_backbone.calls["slices"] == 6  # not called again
    assert second.path == first.path
    assert np.array_equal(second.read(), first.read())


def test_changed_data_or_settings_get_a_separate_entry(tmp_path, tiny_backbone):
    cache = FeatureCache(tmp_path)
    volume = _volume()
    base = compute_features(volume, tiny_backbone, cache)
    edited = volume.data.copy()
    edited[2, 10, 10] ^= 0xFF
    paths = {
        base.path,
        compute_features(Volume(edited, volume.voxel_size), tiny_backbone, cache).path,
        compute_features(volume, tiny_backbone, cache, planes="ortho").path,
        compute_features(volume, tiny_backbone, cache, intensity="percentile").path,
    }
    assert len(paths) == 4
    assert len(cache.entries()) == 4
    # The original entry is untouched by the others.
    assert np.array_equal(compute_features(volume, tiny_backbone, cache).read(), base.read())


def test_changed_model_gets_a_separate_entry(tmp_path, tiny_backbone):
    import warnings

    from napari_dinofuse.backbone import load_backbone

    cache = FeatureCache(tmp_path)
    volume = _volume(shape=(2, 32, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sat = load_backbone("random:tiny", device="cpu", normalization="sat493m")
    assert compute_features(volume, tiny_backbone, cache).path != compute_features(volume, sat, cache).path


def test_interrupted_run_resumes_with_the_missing_slices_only(tmp_path, counting_backbone):
    volume = _volume(shape=(12, 40, 40))
    cache = FeatureCache(tmp_path)
    _cancel_after(extract_features(volume, counting_backbone, cache, batch_size=2), slices=4)
    done_before = counting_backbone.calls["slices"]
    assert done_before == 4
    partial = cache.entries()[0]
    assert 0 < partial.fraction_done < 1
    entry = compute_features(volume, counting_backbone, cache, batch_size=2)
    assert counting_backbone.calls["slices"] == 12  # the 8 missing slices, nothing twice
    reference = compute_features(volume, counting_backbone, FeatureCache(tmp_path / "fresh"), batch_size=2)
    assert np.array_equal(entry.read(), reference.read())


def test_unfinished_units_are_never_read_as_valid(tmp_path, tiny_backbone):
    volume = _volume(shape=(6, 32, 32))
    cache = FeatureCache(tmp_path)
    _cancel_after(extract_features(volume, tiny_backbone, cache, batch_size=2), slices=2)
    entry = FeatureEntry(cache.entries()[0].path)
    assert entry.read((slice(0, 2),)).shape == (64, 2, 2, 2)
    with pytest.raises(CacheError, match="incomplete"):
        entry.read((slice(0, 4),))
    # A unit whose data was written but whose marker was not (process killed in between) is not done.
    entry._arrays["xy"][:, 3] = 1.0
    assert 3 not in entry.done_units("xy")


def test_corrupted_chunk_is_detected_and_recomputed(tmp_path, counting_backbone):
    volume = _volume(shape=(5, 32, 48))
    cache = FeatureCache(tmp_path)
    entry = compute_features(volume, counting_backbone, cache)
    good = entry.read()
    chunk_files = sorted(p for p in (entry.path / "features.zarr" / "xy").rglob("*") if p.is_file()
                         and p.name != "zarr.json")
    assert len(chunk_files) == 5  # one chunk per slice
    victim = chunk_files[2]
    raw = bytearray(victim.read_bytes())
    raw[100:140] = b"\xff" * 40  # bit rot, same length
    victim.write_bytes(bytes(raw))
    chunk_files[4].write_bytes(victim.read_bytes()[:50])  # truncated by a crash
    calls = counting_backbone.calls["slices"]
    repaired = compute_features(volume, counting_backbone, cache)
    assert counting_backbone.calls["slices"] - calls == 2  # exactly the two damaged slices
    # Equal up to float noise: BLAS may round differently for a batch of 1 than for a batch of 4.
    assert np.allclose(repaired.read(), good, atol=1e-2)


def _peak_traced_bytes(volume, backbone, cache) -> int:
    tracemalloc.start()
    try:
        entry = compute_features(volume, backbone, cache, batch_size=2)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        assert entry.complete


def test_memory_stays_bounded_on_a_larger_dask_volume(tmp_path, tiny_backbone):
    # A zarr store on disk, read lazily through dask: 96 slices of 768^2 (54 MiB), and its first quarter.
    import zarr

    store = zarr.create_array(str(tmp_path / "big.zarr"), shape=(96, 768, 768), chunks=(4, 768, 768), dtype="uint8")
    rng = np.random.default_rng(0)
    for z in range(0, 96, 4):
        store[z:z + 4] = rng.integers(0, 256, (4, 768, 768), dtype=np.uint8)
    large = Volume(da.from_zarr(store), voxel_size=(8.0, 4.0, 4.0))
    small = Volume(da.from_zarr(store)[:24], voxel_size=(8.0, 4.0, 4.0))
    peak_small = _peak_traced_bytes(small, tiny_backbone, FeatureCache(tmp_path / "a"))
    peak_large = _peak_traced_bytes(large, tiny_backbone, FeatureCache(tmp_path / "b"))
    # Memory follows the batch and the read slabs, not the volume: 4x the slices, about the same peak,
    # and far below the volume itself.
    assert peak_large < 1.3 * peak_small, (peak_small, peak_large)
    assert peak_large < large.data.nbytes / 2


def test_bad_input_is_refused_clearly(tmp_path, tiny_backbone):
    data = np.random.default_rng(0).random((3, 32, 32)).astype(np.float32)
    data[1, 5, 5] = np.nan
    with pytest.raises(DinofuseError, match="NaN"):
        compute_features(Volume(data, 4.0), tiny_backbone, FeatureCache(tmp_path))
    with pytest.raises(DinofuseError, match="planes"):
        compute_features(_volume(), tiny_backbone, FeatureCache(tmp_path), planes="xz")
    with pytest.raises(DinofuseError, match="multiple of 16"):
        compute_features(_volume(), tiny_backbone, FeatureCache(tmp_path), tile_size=100)


def _set_mtime(path, mtime_ns):
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, mtime_ns))


def _counting_checksums(monkeypatch):
    import napari_dinofuse.cache as cache_module

    counted = {"n": 0}
    original = cache_module.checksum

    def counting(block, kind="crc32"):
        counted["n"] += 1
        return original(block, kind)

    monkeypatch.setattr(cache_module, "checksum", counting)
    return counted


def test_reuse_rechecks_only_units_whose_files_changed(tmp_path, tiny_backbone, monkeypatch):
    volume = _volume(shape=(4, 32, 32))
    cache = FeatureCache(tmp_path)
    entry = compute_features(volume, tiny_backbone, cache)
    # Markers written clearly after their data (as on any file system with fine timestamps) ...
    for unit in range(4):
        (chunk,) = entry._chunk_files("xy", unit)
        _set_mtime(entry._marker("xy", unit), chunk.stat().st_mtime_ns + 10**9)
    # ... except unit 2's, in the same clock tick as its chunk: a rewrite in that tick would keep the
    # mtime, so its stats prove nothing ("racily clean") and it is checksummed.
    (chunk2,) = entry._chunk_files("xy", 2)
    _set_mtime(entry._marker("xy", 2), chunk2.stat().st_mtime_ns)
    checksums = _counting_checksums(monkeypatch)
    compute_features(volume, tiny_backbone, cache)
    assert checksums["n"] == 1  # unit 2 only: the others were trusted on two stat calls, not read
    checksums["n"] = 0
    compute_features(volume, tiny_backbone, cache, verify="all")
    assert checksums["n"] == 4
    with pytest.raises(DinofuseError, match="verify"):
        compute_features(volume, tiny_backbone, cache, verify="sometimes")


def test_damage_that_keeps_size_and_mtime_is_refused_on_read_then_recomputed(tmp_path, counting_backbone):
    volume = _volume(shape=(4, 32, 48))
    cache = FeatureCache(tmp_path)
    good = compute_features(volume, counting_backbone, cache).read()
    entry = FeatureEntry(cache.entries()[0].path)
    (victim,) = entry._chunk_files("xy", 1)
    st = victim.stat()
    raw = bytearray(victim.read_bytes())
    raw[64:72] = bytes(b ^ 0x55 for b in raw[64:72])  # silent bit rot: same size, same mtime
    victim.write_bytes(bytes(raw))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert np.array_equal(entry.read((slice(0, 1),)), good[:, :1])  # other units still read
    with pytest.raises(CacheError, match="damaged"):
        entry.read()  # the chunk's CRC32C fails: never returned as features
    assert entry.done_units("xy") == {0, 2, 3}  # and the unit is unmarked ...
    calls = counting_backbone.calls["slices"]
    repaired = compute_features(volume, counting_backbone, cache)  # ... so the next run recomputes it
    assert counting_backbone.calls["slices"] - calls == 1
    assert np.allclose(repaired.read(), good, atol=1e-2)


def test_markers_of_the_first_format_are_still_trusted_after_a_check(tmp_path, counting_backbone):
    import json

    from napari_dinofuse.cache import checksum

    volume = _volume(shape=(3, 32, 32))
    cache = FeatureCache(tmp_path)
    entry = compute_features(volume, counting_backbone, cache)
    for unit in range(3):  # format 1: a BLAKE2b of the bytes, no file stats; unit 2's is wrong
        block = entry.read((slice(unit, unit + 1),))[:, 0]
        digest = checksum(block, "blake2b") if unit < 2 else "0" * 32
        entry._marker("xy", unit).write_text(json.dumps({"blake2b": digest}))
    calls = counting_backbone.calls["slices"]
    compute_features(volume, counting_backbone, cache)
    assert counting_backbone.calls["slices"] - calls == 1  # unit 2 only
    record = json.loads(entry._marker("xy", 0).read_text())
    assert set(record) == {"crc32", "chunks"}  # checked once, then upgraded


def test_cancel_while_the_writer_is_behind_keeps_exactly_the_computed_slices(tmp_path, counting_backbone,
                                                                             monkeypatch):
    import time

    volume = _volume(shape=(12, 40, 40))
    cache = FeatureCache(tmp_path)
    original = FeatureEntry.write_units

    def slow(self, *args):  # a slow disk: the ViT runs ahead of the writer thread
        time.sleep(0.2)
        return original(self, *args)

    monkeypatch.setattr(FeatureEntry, "write_units", slow)
    _cancel_after(extract_features(volume, counting_backbone, cache, batch_size=2), slices=6)
    assert counting_backbone.calls["slices"] == 6
    entry = FeatureEntry(cache.entries()[0].path)
    assert entry.done_units("xy") == set(range(6))  # closing waited for the writer: nothing computed is lost
    monkeypatch.setattr(FeatureEntry, "write_units", original)
    finished = compute_features(volume, counting_backbone, cache, batch_size=2)
    assert counting_backbone.calls["slices"] == 12
    reference = compute_features(volume, counting_backbone, FeatureCache(tmp_path / "fresh"), batch_size=2)
    assert np.array_equal(finished.read(), reference.read())


def test_a_failed_write_surfaces_and_leaves_no_marker_without_data(tmp_path, counting_backbone, monkeypatch):
    volume = _volume(shape=(10, 32, 32))
    cache = FeatureCache(tmp_path)
    original = FeatureEntry.write_units
    batches = []

    def failing(self, plane, units, blocks):
        batches.append(list(units))
        if len(batches) == 2:  # the first unit's data goes out, then the disk is full
            self._arrays[plane][self._unit_region(plane, units[0])] = blocks[0]
            raise OSError(28, "No space left on device")
        return original(self, plane, units, blocks)

    monkeypatch.setattr(FeatureEntry, "write_units", failing)
    with pytest.raises(OSError, match="No space"):
        compute_features(volume, counting_backbone, cache, batch_size=2)
    assert batches[:2] == [[0, 1], [2, 3]] and len(batches) == 2  # nothing written after the error
    entry = FeatureEntry(cache.entries()[0].path)
    assert entry.done_units("xy") == {0, 1}  # unit 2's data is on disk but unmarked
    monkeypatch.setattr(FeatureEntry, "write_units", original)
    finished = compute_features(volume, counting_backbone, cache, batch_size=2)
    reference = compute_features(volume, counting_backbone, FeatureCache(tmp_path / "fresh"), batch_size=2)
    assert np.array_equal(finished.read(), reference.read())


def test_an_error_mid_volume_keeps_the_batches_before_it(tmp_path, tiny_backbone, monkeypatch):
    volume = _volume(shape=(6, 32, 32))
    cache = FeatureCache(tmp_path)
    original = tiny_backbone.patch_features
    calls = []

    def out_of_memory_on_the_third_batch(images):
        calls.append(images.shape[0])
        if len(calls) == 3:
            raise RuntimeError("CUDA out of memory")
        return original(images)

    monkeypatch.setattr(tiny_backbone, "patch_features", out_of_memory_on_the_third_batch)
    with pytest.raises(RuntimeError, match="out of memory"):
        compute_features(volume, tiny_backbone, cache, batch_size=2)
    entry = FeatureEntry(cache.entries()[0].path)
    assert entry.done_units("xy") == {0, 1, 2, 3}  # the batches handed to the writer were written
