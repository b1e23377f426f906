"""Chunked feature extraction into the resumable zarr cache (random tiny ViT: real code paths, fake weights)."""

import os
import tracemalloc

import dask.array as da
import numpy as np
import pytest

from napari_dinofuse.errors import CacheError, DinofuseError
from napari_dinofuse.features.backbone import to_unit_range
from napari_dinofuse.features.cache import FeatureCache, FeatureEntry
from napari_dinofuse.features.extract import compute_features, extract_features, feature_grid
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

    from napari_dinofuse.features.backbone import load_backbone

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
    import napari_dinofuse.features.cache as cache_module

    counted = {"n": 0}
    original = cache_module.checksum

    def counting(block, kind="crc32"):
        counted["n"] += 1
        return original(block, kind)

    monkeypatch.setattr(cache_module, "checksum", counting)
    return counted


def test_reuse_rechecks_only_units_whose_files_changed(tmp_path, tiny_backbone, monkeypatch):
    import json
    import time

    volume = _volume(shape=(4, 32, 32))
    cache = FeatureCache(tmp_path)
    entry = compute_features(volume, tiny_backbone, cache)
    assert not entry._loose("xy")  # the run folded its markers into one file
    # Markers taken clearly after their data (as on any file system with fine timestamps) ...
    record_file = entry.path / "done" / "units.json"
    taken = time.time_ns() - 10 * 10**9
    for unit in range(4):
        _set_mtime(entry._chunk_files("xy", unit)[0], taken - 10**9)
    # ... except unit 2's chunk, rewritten in the clock tick they were taken in: a rewrite in that tick
    # would keep the mtime, so its stats prove nothing ("racily clean") and it is checksummed.
    _set_mtime(entry._chunk_files("xy", 2)[0], taken)
    record = json.loads(record_file.read_text())
    for unit in range(4):
        record["xy"][str(unit)]["chunks"] = entry._marker_record("xy", unit, "")["chunks"]
    record_file.write_text(json.dumps(record))
    _set_mtime(record_file, taken)
    checksums = _counting_checksums(monkeypatch)
    compute_features(volume, tiny_backbone, cache)
    assert checksums["n"] == 1  # unit 2 only: the others were trusted on stat calls, not read
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


def test_a_small_part_of_a_chunk_reads_as_the_whole_does_and_a_cut_short_chunk_is_still_refused(tmp_path,
                                                                                                   tiny_backbone):
    """A training tile reads 2 x 2 patches of slices stored whole: that part alone is read from the file."""
    volume = _volume(shape=(3, 96, 128))  # 6 x 8 patches a slice, one chunk per slice
    entry = compute_features(volume, tiny_backbone, FeatureCache(tmp_path))
    whole = entry.read()
    for region in [(slice(0, 3), slice(2, 4), slice(5, 7)), (slice(1, 2), slice(0, 1), slice(7, 8))]:
        assert np.array_equal(entry.read(region), whole[(slice(None), *region)])
    (victim,) = entry._chunk_files("xy", 2)
    victim.write_bytes(victim.read_bytes()[:-10])  # cut short by a crash
    assert np.array_equal(entry.read((slice(0, 2), slice(2, 4), slice(5, 7))), whole[:, 0:2, 2:4, 5:7])
    with pytest.raises(CacheError, match="damaged"):
        entry.read((slice(2, 3), slice(2, 4), slice(5, 7)))
    assert entry.done_units("xy") == {0, 1}


def test_markers_of_the_first_format_are_still_trusted_after_a_check(tmp_path, counting_backbone):
    import json

    from napari_dinofuse.features.cache import checksum

    volume = _volume(shape=(3, 32, 32))
    cache = FeatureCache(tmp_path)
    entry = compute_features(volume, counting_backbone, cache)
    for unit in range(3):  # format 1: a BLAKE2b of the bytes, no file stats; unit 2's is wrong
        block = entry.read((slice(unit, unit + 1),))[:, 0]
        digest = checksum(block, "blake2b") if unit < 2 else "0" * 32
        entry._marker("xy", unit).write_text(json.dumps({"blake2b": digest}))
    (entry.path / "done" / "units.json").unlink()
    calls = counting_backbone.calls["slices"]
    compute_features(volume, counting_backbone, cache)
    assert counting_backbone.calls["slices"] - calls == 1  # unit 2 only
    record = json.loads((entry.path / "done" / "units.json").read_text())
    assert set(record["xy"]["0"]) == {"crc32", "chunks"}  # checked once, then upgraded and folded
    assert not entry._loose("xy")


def test_markers_of_single_units_are_folded_into_one_file_after_their_checks(tmp_path, counting_backbone,
                                                                             monkeypatch):
    import json
    import time

    volume = _volume(shape=(5, 32, 32))
    cache = FeatureCache(tmp_path)
    entry = compute_features(volume, counting_backbone, cache)
    good = entry.read()
    folded = entry.path / "done" / "units.json"
    assert sorted(p.name for p in (entry.path / "done").iterdir()) == ["units.json"]
    # What an earlier version (or a cancelled run) leaves: one marker per unit, taken after its data, no units.json.
    taken = time.time_ns() - 10 * 10**9
    for unit, record in json.loads(folded.read_text())["xy"].items():
        _set_mtime(entry._chunk_files("xy", int(unit))[0], taken - 10**9)
        entry._marker("xy", int(unit)).write_text(json.dumps(entry._marker_record("xy", int(unit), record["crc32"])))
        _set_mtime(entry._marker("xy", int(unit)), taken)
    folded.unlink()
    entry._chunk_files("xy", 3)[0].unlink()  # a marker whose data are gone: never folded in as done
    read = []
    region = FeatureEntry._unit_region
    monkeypatch.setattr(FeatureEntry, "_unit_region", lambda self, p, unit: read.append(unit) or region(self, p, unit))
    calls = counting_backbone.calls["slices"]
    repaired = compute_features(volume, counting_backbone, cache)
    assert set(read) == {3} and counting_backbone.calls["slices"] - calls == 1  # the others trusted on stat calls
    assert np.allclose(repaired.read(), good, atol=1e-2)
    assert sorted(json.loads(folded.read_text())["xy"]) == ["0", "1", "2", "3", "4"] and not entry._loose("xy")
    # Damage to a folded unit is seen as before: that unit alone is unmarked and recomputed.
    victim = entry._chunk_files("xy", 1)[0]
    victim.write_bytes(victim.read_bytes()[:50])
    read.clear()
    compute_features(volume, counting_backbone, cache)
    assert set(read) == {1} and counting_backbone.calls["slices"] - calls == 2
    assert np.allclose(entry.read(), good, atol=1e-2)
    # A unit unmarked by a failed read leaves units.json too.
    victim.write_bytes(victim.read_bytes()[:50])
    with pytest.raises(CacheError, match="damaged"):
        FeatureEntry(entry.path).read()
    assert entry.done_units("xy") == {0, 2, 3, 4}


@pytest.fixture
def one_writer(monkeypatch):
    """Batches written in order by one thread (as on a 2-core machine), for tests of what is written when."""
    from napari_dinofuse.features import extract as features

    monkeypatch.setattr(features, "writer_threads", lambda: 1)


def test_cancel_while_the_writer_is_behind_keeps_exactly_the_computed_slices(tmp_path, counting_backbone,
                                                                             monkeypatch, one_writer):
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


def test_a_failed_write_surfaces_and_leaves_no_marker_without_data(tmp_path, counting_backbone, monkeypatch,
                                                                   one_writer):
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


def test_a_read_error_ahead_surfaces_and_keeps_the_batches_before_it(tmp_path, tiny_backbone, monkeypatch):
    """Input batches are read on a thread one batch ahead: a failing read (a file gone, a network share down)
    still stops the run with its own error, keeps what was computed, and leaves no thread behind."""
    import threading

    from napari_dinofuse.features import extract as features

    volume = _volume(shape=(8, 32, 32))
    original, reads = features.read_region, []

    def failing_third_read(data, region):
        reads.append(region)
        if len(reads) == 3:
            raise OSError(5, "Input/output error")
        return original(data, region)

    monkeypatch.setattr(features, "read_region", failing_third_read)
    with pytest.raises(OSError, match="Input/output"):
        compute_features(volume, tiny_backbone, FeatureCache(tmp_path), batch_size=2)
    entry = FeatureEntry(FeatureCache(tmp_path).entries()[0].path)
    assert entry.done_units("xy") == {0, 1, 2, 3}
    assert not [t for t in threading.enumerate() if t.name.startswith("dinofuse-feature-reader")]


def test_several_writer_threads_store_every_batch_and_stop_on_cancel(tmp_path, counting_backbone, monkeypatch):
    import time

    from napari_dinofuse.features import extract as features

    monkeypatch.setattr(features, "writer_threads", lambda: 3)
    volume = _volume(shape=(14, 40, 40))
    reference = compute_features(volume, counting_backbone, FeatureCache(tmp_path / "reference"), batch_size=2)
    original = FeatureEntry.write_units

    def slow(self, *args):  # a slow disk: batches wait for the writers
        time.sleep(0.1)
        return original(self, *args)

    monkeypatch.setattr(FeatureEntry, "write_units", slow)
    cache = FeatureCache(tmp_path / "threads")
    _cancel_after(extract_features(volume, counting_backbone, cache, batch_size=2), slices=8)
    assert FeatureEntry(cache.entries()[0].path).done_units("xy") == set(range(8))  # all handed over, written
    finished = compute_features(volume, counting_backbone, cache, batch_size=2)
    assert np.array_equal(finished.read(), reference.read())


def test_out_of_memory_retries_once_with_half_the_batch(tmp_path, tiny_backbone, monkeypatch):
    import torch

    from napari_dinofuse.errors import MemoryRetryWarning

    volume = _volume(shape=(8, 32, 32))
    reference = compute_features(volume, tiny_backbone, FeatureCache(tmp_path / "reference"), batch_size=4)
    original = tiny_backbone.patch_features
    sizes = []

    def small_device(images):  # a GPU that holds 2 slices at a time
        sizes.append(images.shape[0])
        if images.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(images)

    monkeypatch.setattr(tiny_backbone, "patch_features", small_device)
    with pytest.warns(MemoryRetryWarning, match="retrying with 2"):
        entry = compute_features(volume, tiny_backbone, FeatureCache(tmp_path / "retry"), batch_size=4)
    assert sizes == [4, 2, 2, 2, 2]  # one failed batch of 4, then halves only (8 slices)
    assert np.array_equal(entry.read(), reference.read())

    def no_device(images):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(tiny_backbone, "patch_features", no_device)
    with pytest.raises(torch.OutOfMemoryError), pytest.warns(MemoryRetryWarning):  # retried once, then raised
        compute_features(_volume(seed=1), tiny_backbone, FeatureCache(tmp_path / "none"), batch_size=4)


def _zarr_volume(path, data, chunks, **kwargs):
    import zarr

    zarr.create_array(str(path), shape=data.shape, chunks=chunks, dtype=data.dtype, **kwargs)[:] = data
    return Volume(zarr.open_array(str(path), mode="r"), voxel_size=(8.0, 4.0, 4.0), name="raw")


def _age(folder, seconds=10):
    """Files written a while ago: younger ones are not trusted to identify an input (see the next tests)."""
    import time

    for path in folder.rglob("*"):
        if path.is_file():
            _set_mtime(path, time.time_ns() - seconds * 10**9)


def test_an_unchanged_input_on_disk_is_identified_without_reading_it(tmp_path, counting_backbone, monkeypatch):
    from napari_dinofuse import io
    from napari_dinofuse.features import extract as features

    data = np.random.default_rng(0).integers(0, 4000, (32, 48, 64), dtype=np.uint16)  # percentile intensities
    volume = _zarr_volume(tmp_path / "raw.zarr", data, chunks=(1, 48, 64))
    _age(tmp_path / "raw.zarr")
    cache = FeatureCache(tmp_path / "cache")
    first = compute_features(volume, counting_backbone, cache)
    read, ranges = {"voxels": 0}, {"n": 0}
    read_region, intensity_range = io.read_region, features.intensity_range

    def counted_read(array, region):
        block = read_region(array, region)
        read["voxels"] += block.size
        return block

    def counted_range(*args):
        ranges["n"] += 1
        return intensity_range(*args)

    monkeypatch.setattr(io, "read_region", counted_read)
    monkeypatch.setattr(features, "intensity_range", counted_range)
    second = compute_features(volume, counting_backbone, cache)
    assert second.path == first.path and counting_backbone.calls["slices"] == 32
    assert read["voxels"] <= data.size // 4 and ranges["n"] == 0  # stat calls and a sample of 8 chunks
    # The same voxels in memory: the same entry (the identity is the content's), found by reading them all.
    read["voxels"] = 0
    assert compute_features(Volume(data, (8.0, 4.0, 4.0)), counting_backbone, cache).path == first.path
    assert read["voxels"] >= data.size
    read["voxels"] = 0
    assert compute_features(volume, counting_backbone, cache, verify="all").path == first.path
    assert read["voxels"] >= data.size and ranges["n"] == 2  # verify="all": the input is read whole again


def test_a_rewritten_chunk_on_disk_is_a_new_input(tmp_path, counting_backbone):
    data = np.random.default_rng(0).integers(0, 256, (32, 32, 32), dtype=np.uint8)
    # Uncompressed: a rewritten chunk keeps its size. Chunk 2 is not among the 8 sampled (0, 4, 9, ...).
    volume = _zarr_volume(tmp_path / "raw.zarr", data, chunks=(1, 32, 32), compressors=None)
    cache = FeatureCache(tmp_path / "cache")

    def rewrite_chunk(z, keep_mtime=False):
        chunk = tmp_path / "raw.zarr" / "c" / str(z) / "0" / "0"
        before = chunk.stat()
        chunk.write_bytes(bytes(255 - b for b in chunk.read_bytes()))
        assert chunk.stat().st_size == before.st_size
        if keep_mtime:
            _set_mtime(chunk, before.st_mtime_ns)

    # Files written just before the input is identified are not trusted later: a rewrite within the same
    # tick of a coarse clock would keep their size and time ("racily clean") ...
    first = compute_features(volume, counting_backbone, cache)
    rewrite_chunk(2, keep_mtime=True)
    second = compute_features(volume, counting_backbone, cache)
    assert second.path != first.path and counting_backbone.calls["slices"] == 64
    # ... older ones are, until one is rewritten, even to the same size.
    _age(tmp_path / "raw.zarr")
    compute_features(volume, counting_backbone, cache)
    rewrite_chunk(2)
    third = compute_features(volume, counting_backbone, cache)
    assert third.path == first.path and counting_backbone.calls["slices"] == 64  # back to the first data
    # A change that keeps a file's size and time shows in the sampled chunks.
    _age(tmp_path / "raw.zarr")
    compute_features(volume, counting_backbone, cache)
    rewrite_chunk(4, keep_mtime=True)
    fourth = compute_features(volume, counting_backbone, cache)
    assert fourth.path not in (first.path, second.path) and counting_backbone.calls["slices"] == 96


@pytest.mark.parametrize("planes", ["xy", "ortho"])
def test_chunks_written_without_zarr_are_the_files_zarr_writes(tmp_path, tiny_backbone, monkeypatch, planes):
    """The writer threads store chunk files themselves (zarr's one event loop serialised them); a reader, zarr
    included, must not be able to tell: same bytes, CRC32C and edge-chunk padding, for every plane family."""
    from napari_dinofuse.features import cache as cache_module

    monkeypatch.setattr(cache_module, "_MAX_CHUNK_BYTES", 64 * 4 * 2 * 2)  # several chunks a unit, xy's cut at x
    volume = _volume(shape=(5, 50, 70))
    direct = compute_features(volume, tiny_backbone, FeatureCache(tmp_path / "direct"), planes=planes)
    assert all(direct._direct.values())
    monkeypatch.setattr(FeatureEntry, "_write_chunks", lambda self, plane, unit, block:
                        self._arrays[plane].__setitem__(self._unit_region(plane, unit), block))
    through_zarr = compute_features(volume, tiny_backbone, FeatureCache(tmp_path / "zarr"), planes=planes)
    for plane in direct.planes:
        array = direct._arrays[plane]
        assert plane != "xy" or array.chunks == (64, 1, 4, 2)  # 3 chunks a slice, the last one cut
        for unit in range(direct.unit_count(plane)):
            ours, theirs = direct._chunk_files(plane, unit), through_zarr._chunk_files(plane, unit)
            assert len(ours) > 1 and [p.read_bytes() for p in ours] == [p.read_bytes() for p in theirs]
    assert np.array_equal(direct.read(), through_zarr.read())
    assert not list((tmp_path / "direct").rglob("*.tmp"))  # no temporary files left behind


@pytest.mark.parametrize("planes", ["xy", "ortho"])
def test_reads_from_the_chunk_files_are_zarrs_reads(tmp_path, tiny_backbone, monkeypatch, planes):
    """Reads skip zarr as well (its one event loop held the prediction's reader thread up): any region, across
    cut and edge chunks, reads what zarr reads, and a chunk zarr would not store (all zeros) reads as zeros."""
    from napari_dinofuse.features import cache as cache_module

    monkeypatch.setattr(cache_module, "_MAX_CHUNK_BYTES", 64 * 4 * 2 * 2)  # several chunks a unit, cut at x
    entry = compute_features(_volume(shape=(5, 50, 70)), tiny_backbone, FeatureCache(tmp_path), planes=planes)
    entry._chunk_files(entry.planes[0], 1)[1].unlink()
    through_zarr = FeatureEntry(entry.path)
    through_zarr._direct = dict.fromkeys(entry.planes, False)
    rng = np.random.default_rng(0)
    regions = [(slice(None),) * 3, (slice(1, 2), slice(1, 2), slice(0, 1))]
    for _ in range(12):
        regions.append(tuple(slice(a, a + rng.integers(1, n - a + 1))
                             for a, n in ((rng.integers(0, n), n) for n in entry.shape[1:])))
    for region in regions:
        ours, theirs = entry.read(region), through_zarr.read(region)
        assert ours.dtype == theirs.dtype == np.float16 and np.array_equal(ours, theirs), region
    if planes == "xy":  # the missing chunk: slice 1, x patches 2 and 3
        assert not entry.read((slice(1, 2), slice(None), slice(2, 4))).any() and entry.read((slice(1, 2),)).any()


def test_reads_beyond_the_volume_repeat_its_edge():
    """What tiles at the volume's faces (and before its first slice) get: np.pad's "edge" of the volume, for
    ranges partly or wholly outside it; inside it, the data itself, with no copy."""
    from napari_dinofuse.features.extract import _read_padded

    data = np.random.default_rng(0).integers(0, 255, (5, 6, 7), dtype=np.uint8)
    far = 9
    padded = np.pad(data, far, mode="edge")
    rng = np.random.default_rng(1)
    cases = [((0, 0, 0), (5, 6, 7)), ((-3, -1, 2), (2, 6, 9)), ((6, 7, 8), (8, 9, 10)), ((-4, -4, -4), (-1, 0, 3))]
    cases += [tuple(zip(*[sorted(rng.integers(-far, n + far, 2)) for n in data.shape])) for _ in range(30)]
    for start, stop in cases:
        start, stop = np.array(start), np.maximum(np.array(stop), np.array(start) + 1)
        expected = padded[tuple(slice(a + far, b + far) for a, b in zip(start, stop))]
        assert np.array_equal(_read_padded(data, start, stop), expected), (start, stop)
    assert np.shares_memory(_read_padded(data, (1, 1, 1), (3, 4, 5)), data)


def test_only_arrays_stored_as_the_cache_writes_them_skip_zarr(tmp_path, counting_backbone):
    """A cache hit learns each plane's chunk layout from its zarr.json without opening zarr (a millisecond or two
    of a hit). An array stored any other way (compressed, without checksums, another dtype, key separator or fill
    value, zarr v2) is left to zarr, and its features read, are reused and are written as before."""
    import zarr
    from zarr.codecs import Crc32cCodec, ZstdCodec

    from napari_dinofuse.features.cache import _plain_chunks

    def layout(name, **settings):
        settings = {"shape": (8, 3, 4, 4), "chunks": (8, 1, 4, 2), "dtype": "float16",
                    "compressors": [Crc32cCodec()], "fill_value": 0, **settings}
        zarr.create_array(str(tmp_path / name), **settings)
        return _plain_chunks(tmp_path / name / "zarr.json")

    assert layout("plain") == (8, 1, 4, 2)
    assert layout("zstd", compressors=[ZstdCodec(), Crc32cCodec()]) is None
    assert layout("no checksum", compressors=None) is None
    assert layout("float32", dtype="float32") is None
    assert layout("dots", chunk_key_encoding={"name": "default", "separator": "."}) is None
    assert layout("ones", fill_value=1) is None
    assert layout("v2", zarr_format=2, compressors=None) is None

    volume = _volume()
    cache = FeatureCache(tmp_path / "cache")
    entry = compute_features(volume, counting_backbone, cache)
    expected = entry.read()
    # The same features stored compressed, as another writer might have stored them.
    group = zarr.open_group(str(entry.path / "features.zarr"), mode="r+")
    group.create_array("xy", data=expected, chunks=(expected.shape[0], 1, 2, 2),
                       compressors=[ZstdCodec(), Crc32cCodec()], fill_value=0, overwrite=True)
    _age(entry.path)
    foreign = FeatureEntry(entry.path)
    assert foreign._direct == {"xy": False}
    assert np.array_equal(foreign.read(), expected)
    assert foreign._chunk_paths("xy", 1)[0].endswith("features.zarr/xy/c/0/1/0/0")
    # Found in the cache: its files changed since their markers, so each unit is re-checksummed, not recomputed.
    again = compute_features(volume, counting_backbone, cache)
    assert again.path == entry.path and counting_backbone.calls["slices"] == volume.shape[0]
    assert np.array_equal(again.read(), expected)
    foreign.write_unit("xy", 2, np.zeros_like(expected[:, 2]))
    assert not foreign.read()[:, 2].any() and np.array_equal(foreign.read()[:, 3], expected[:, 3])
