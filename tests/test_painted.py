"""The snapshot of painted strokes a fine-tune works on (annotations.PaintedLabels): it reads like the labels it
was taken from, and is saved as them."""

import numpy as np
import pytest
import zarr

from napari_dinofuse.annotations import PaintedLabels, find_painted, load_annotations, save_annotations
from napari_dinofuse.errors import InputError
from napari_dinofuse.geometry import Grid


def _strokes(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, dtype)
    for k in (1, 2, 3):
        for _ in range(4):  # short lines along x, and a few single voxels
            z, y, x = (int(rng.integers(0, n)) for n in shape)
            labels[z, y, x:x + 9] = k
            labels[tuple(int(rng.integers(0, n)) for n in shape)] = k
    labels[shape[0] // 2, : shape[1] // 2, 3:] = 1  # a bucket fill of half a slice
    return labels


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.int64])
def test_the_snapshot_reads_like_the_labels_it_was_taken_from(dtype):
    labels = _strokes((21, 40, 70), dtype)
    painted = find_painted(labels, labels.shape)
    assert painted.counts == {k: int((labels == k).sum()) for k in (1, 2, 3)}
    rng = np.random.default_rng(1)
    for _ in range(100):  # boxes anywhere, empty ones and ones reaching past the faces included
        box = tuple(slice(*sorted(int(v) for v in rng.integers(-2, n + 3, 2))) for n in labels.shape)
        assert np.array_equal(painted[box], labels[box]) and painted[box].dtype == labels.dtype, box
    assert np.array_equal(painted[5:9], labels[5:9]) and np.array_equal(np.asarray(painted), labels)
    before = labels.copy()
    labels[3, 3, 3:20] = 2  # painting on after the snapshot leaves it as it was
    assert np.array_equal(np.asarray(painted), before)
    # It holds a copy of the chunks with strokes only.
    touched = {tuple(c) for c in np.argwhere(before) // np.array(PaintedLabels.CHUNK)}
    assert set(painted.blocks) == touched
    with pytest.raises(TypeError, match="boxes"):
        painted[::2]


def test_negative_labels_are_refused_when_the_snapshot_is_taken():
    labels = _strokes((8, 16, 16), np.int16)
    labels[7, 15, 15] = -1
    with pytest.raises(InputError, match="negative"):
        find_painted(labels, labels.shape)


def test_a_snapshot_is_saved_as_the_labels_and_only_where_strokes_are(tmp_path):
    labels = _strokes((70, 600, 300), np.uint8)
    painted = find_painted(labels, labels.shape)
    grid = Grid(labels.shape, (8.0, 4.0, 4.0), (10.0, 0.0, 0.0))
    save_annotations(tmp_path / "sparse.zarr", painted, grid)
    save_annotations(tmp_path / "dense.zarr", labels, grid)
    sparse, dense = load_annotations(tmp_path / "sparse.zarr"), load_annotations(tmp_path / "dense.zarr")
    assert np.array_equal(sparse.data[:], labels) and np.array_equal(dense.data[:], labels)
    assert sparse.grid == dense.grid == grid
    # Unpainted chunks are the fill value, never written: an autosave costs what the strokes cover.
    array = zarr.open_array(str(tmp_path / "sparse.zarr" / "0"), mode="r")
    points = np.concatenate(list(painted.coords.values()))
    touched = {tuple(c) for c in points // np.array(array.chunks)}
    assert array.nchunks_initialized == len(touched) < array.nchunks


def test_training_splits_keep_the_snapshot_shape_and_dtype():
    from napari_dinofuse.training.train import split_strokes

    labels = _strokes((10, 30, 30), np.uint16)
    train, held = split_strokes(find_painted(labels, labels.shape), 0.3, seed=0)
    assert isinstance(train, PaintedLabels) and train.shape == labels.shape and train.dtype == labels.dtype
    remaining = labels.copy()
    for points in held.values():
        remaining[tuple(points.T)] = 0
    assert np.array_equal(np.asarray(train), remaining)  # what training reads: the strokes not held out


def test_a_stored_or_lazy_labels_volume_gives_the_same_snapshot(tmp_path):
    import dask.array as da

    labels = _strokes((45, 70, 300), np.uint16)
    stored = zarr.create_array(str(tmp_path / "labels.zarr"), shape=labels.shape, dtype=labels.dtype,
                               chunks=(20, 64, 64))  # chunks deeper than a snapshot's, and not a multiple
    stored[:] = labels
    expected = find_painted(labels, labels.shape)
    for array in (stored, da.from_array(labels, chunks=(13, 70, 100))):
        painted = find_painted(array, labels.shape)
        assert set(painted.blocks) == set(expected.blocks) and np.array_equal(np.asarray(painted), labels)
        assert all(np.array_equal(painted.coords[k], expected.coords[k]) for k in expected.coords)
