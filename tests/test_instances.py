"""Objects and measurements from a class map: what a biologist counts and measures must not depend on blocks."""

import numpy as np
import pytest
import zarr

from napari_dinofuse.errors import InputError
from napari_dinofuse.geometry import Grid
from napari_dinofuse.inference.instances import (
    ObjectSettings,
    find_objects,
    objects_in_prediction,
    parse_classes,
    read_table_csv,
)
from napari_dinofuse.inference.outputs import ZarrSink
from napari_dinofuse.progress import drive

WHOLE = (512, 512, 512)


def _ball(shape, centre, radius_nm, voxel_size):
    zyx = np.indices(shape).astype(float)
    d2 = sum(((zyx[a] - centre[a]) * voxel_size[a]) ** 2 for a in range(3))
    return d2 <= radius_nm**2


def _objects(labels, settings, voxel_size=(4.0, 4.0, 4.0), offset=(0.0, 0.0, 0.0), **kwargs):
    return drive(find_objects(labels, Grid(labels.shape, voxel_size, offset), settings, **kwargs))


def test_touching_blobs_split_only_when_asked():
    vs = (4.0, 4.0, 4.0)
    labels = np.ones((40, 60, 80), np.uint8)
    labels[_ball(labels.shape, (20, 30, 25), 48, vs) | _ball(labels.shape, (20, 30, 47), 48, vs)] = 3
    one, table = _objects(labels, ObjectSettings(3), vs)
    assert len(table) == 1 and set(np.unique(one)) == {0, 1}
    two, table = _objects(labels, ObjectSettings(3, split_depth_nm=8), vs)
    assert len(table) == 2 and set(np.unique(two)) == {0, 1, 2}
    assert (two > 0).sum() == (labels == 3).sum()  # splitting moves no voxel in or out
    left, right = two[20, 30, 25], two[20, 30, 47]
    assert left != right and left > 0 and right > 0
    assert abs(int((two == 1).sum()) - int((two == 2).sum())) < 0.05 * (two > 0).sum()


def test_an_object_across_block_borders_keeps_one_id_and_classes_never_merge():
    labels = np.ones((20, 40, 40), np.uint8)
    labels[5:15, 5:35, 10:12] = 3  # a wall crossing every block border below
    labels[5:15, 5:35, 12:14] = 2  # touching it, another class
    labels[2, 2, 2] = 3
    out, table = _objects(labels, ObjectSettings((2, 3)), block_shape=(7, 9, 11))
    assert len(table) == 3
    assert len(np.unique(out[5:15, 5:35, 10:12])) == 1 and len(np.unique(out[5:15, 5:35, 12:14])) == 1
    assert out[5, 5, 10] != out[5, 5, 12]
    # Numbered by first voxel in z, y, x order: the lone voxel first, then the wall (y, x = 5, 10), then class 2.
    assert out[2, 2, 2] == 1 and out[5, 5, 10] == 2 and out[5, 5, 12] == 3
    assert table.columns["class"].tolist() == [3, 3, 2]


@pytest.mark.parametrize("split", [0.0, 8.0])
def test_blockwise_equals_whole_volume_on_the_synthetic_sample(split):
    from napari_dinofuse.synthetic.sample import make_sample

    sample = make_sample(seed=0)
    truth = sample.ground_truth
    settings = ObjectSettings((2, 3, 4), min_size_nm3=20_000, split_depth_nm=split)
    grid = Grid(truth.shape, sample.raw.voxel_size, sample.raw.offset)
    whole, expected = drive(find_objects(truth, grid, settings, block_shape=WHOLE))
    assert len(expected) >= 5 and set(expected.columns["class"]) == {2, 3, 4}
    for block_shape in [(8, 64, 64), (5, 37, 71)]:
        blocks, table = drive(find_objects(truth, grid, settings, block_shape=block_shape))
        assert np.array_equal(blocks, whole), block_shape
        for name, values in expected.columns.items():
            if values.dtype.kind == "f":
                np.testing.assert_allclose(table.columns[name], values, rtol=1e-9, err_msg=name)
            else:
                assert np.array_equal(table.columns[name], values), name
        assert table.totals == expected.totals


def test_objects_written_into_zarr_through_a_small_chunk_budget_equal_those_in_memory(monkeypatch):
    import napari_dinofuse.inference.instances as instances
    from napari_dinofuse.synthetic.sample import make_sample

    sample = make_sample(seed=0)
    truth = sample.ground_truth
    settings = ObjectSettings((2, 3, 4), split_depth_nm=8)
    grid = Grid(truth.shape, sample.raw.voxel_size, sample.raw.offset)
    in_memory, expected = drive(find_objects(truth, grid, settings, block_shape=(16, 96, 96)))
    monkeypatch.setattr(instances, "HELD_BYTES", 3 * 8 * 32 * 32 * 4)  # three chunks: held ones are written back
    store = zarr.create_array(zarr.storage.MemoryStore(), shape=truth.shape, chunks=(8, 32, 32), dtype=np.uint32)
    out, table = drive(find_objects(truth, grid, settings, out=store, block_shape=(16, 96, 96)))
    assert out is store and np.array_equal(store[...], in_memory)
    assert np.array_equal(table.columns["voxels"], expected.columns["voxels"]) and len(table) >= 5


def test_a_sphere_is_measured_within_three_percent_in_anisotropic_voxels():
    vs, offset = (8.0, 4.0, 4.0), (100.0, -40.0, 20.0)
    shape, centre, radius = (40, 80, 80), (20.0, 41.0, 39.0), 120.0
    labels = np.ones(shape, np.uint8)
    labels[_ball(shape, centre, radius, vs)] = 2
    probabilities = np.stack([np.full(shape, 0.2, np.float16), np.full(shape, 0.8, np.float16)])
    uncertainty = np.full(shape, 0.25, np.float16)
    out, table = _objects(labels, ObjectSettings(2), vs, offset, probabilities=probabilities,
                          uncertainty=uncertainty, class_names=["background", "mito"], block_shape=(16, 32, 32))
    row = {name: values[0] for name, values in table.columns.items()}
    assert len(table) == 1 and row["class_name"] == "mito"
    assert row["volume_nm3"] == pytest.approx(4 / 3 * np.pi * radius**3, rel=0.03)
    assert row["surface_nm2"] == pytest.approx(4 * np.pi * radius**2, rel=0.05)
    centre_nm = np.asarray(offset) + np.asarray(centre) * vs
    assert [row[f"centroid_{a}_nm"] for a in "zyx"] == pytest.approx(centre_nm.tolist(), abs=0.5)
    for a, axis in zip("zyx", range(3)):  # the box's outer faces enclose the sphere, by less than a voxel
        assert centre_nm[axis] - radius - vs[axis] < row[f"bbox_start_{a}_nm"] <= centre_nm[axis] - radius
        assert centre_nm[axis] + radius <= row[f"bbox_stop_{a}_nm"] < centre_nm[axis] + radius + vs[axis]
    assert row["mean_probability"] == pytest.approx(0.8, abs=1e-3)
    assert row["mean_uncertainty"] == pytest.approx(0.25, abs=1e-3)
    region = np.prod(shape) * np.prod(vs)
    assert table.totals[0]["volume_fraction"] == pytest.approx(row["volume_nm3"] / region)


def test_holes_are_filled_and_small_objects_dropped():
    vs = (4.0, 4.0, 4.0)
    labels = np.ones((30, 30, 30), np.uint8)
    shell = _ball(labels.shape, (15, 15, 15), 40, vs) & ~_ball(labels.shape, (15, 15, 15), 20, vs)
    labels[shell] = 2
    labels[1:3, 1:3, 1:3] = 2  # 8 voxels = 512 nm³
    filled, table = _objects(labels, ObjectSettings(2, min_size_nm3=1000))
    assert len(table) == 1 and filled[15, 15, 15] == 1 and filled[1, 1, 1] == 0
    assert table.columns["voxels"][0] == _ball(labels.shape, (15, 15, 15), 40, vs).sum()
    hollow, table = _objects(labels, ObjectSettings(2, fill_holes=False))
    assert len(table) == 2 and hollow[15, 15, 15] == 0


def test_objects_too_large_to_refine_are_kept_whole_with_a_warning():
    labels = np.ones((10, 20, 20), np.uint8)
    labels[2:8, 2:18, 2:18] = 2
    steps = []
    out, table = drive(find_objects(labels, Grid(labels.shape, 4), ObjectSettings(2, split_depth_nm=4),
                                    refine_limit=100), steps.append)
    assert len(table) == 1 and table.unrefined == 1
    assert any(s.message.startswith("warning:") and "not filled or split" in s.message for s in steps)


def _prediction(path, labels, class_names=("background", "membrane", "mito")):
    grid = Grid(labels.shape, (8.0, 4.0, 4.0), (40.0, 0.0, 0.0))
    region = (slice(None),) * 3
    sink = ZarrSink(path, chunks=(8, 16, 16))
    sink.create("labels", labels.shape, np.uint8, grid)
    sink.write("labels", region, labels)
    probabilities = np.eye(len(class_names), dtype=np.float16)[labels - 1].transpose(3, 0, 1, 2)
    sink.create("probabilities", probabilities.shape, np.float16, grid)
    sink.write("probabilities", region, probabilities)
    sink.create("uncertainty", labels.shape, np.float16, grid)
    sink.set_info(class_names=list(class_names))
    sink.finish()


def test_objects_beside_a_saved_prediction_open_with_their_measurements(tmp_path):
    from napari_dinofuse._napari.reader import read

    labels = np.ones((16, 32, 32), np.uint8)
    labels[2:6, 4:12, 4:12] = 3
    labels[9:14, 20:30, 3:9] = 3
    path = tmp_path / "pred.zarr"
    _prediction(path, labels)
    table = drive(objects_in_prediction(path, ObjectSettings(parse_classes("Mito", ["background", "membrane",
                                                                                     "mito"])),
                                        block_shape=(8, 16, 16)))
    assert len(table) == 2 and table.totals[0]["count"] == 2 and table.columns["mean_probability"].tolist() == [1, 1]
    assert "instances" in zarr.open_group(str(path), mode="r").attrs["dinofuse"]["outputs"]
    layers = {meta["name"]: (data, meta, kind) for data, meta, kind in read(str(path))}
    data, meta, kind = layers["instances"]
    assert kind == "labels" and meta["scale"] == (8.0, 4.0, 4.0) and meta["translate"] == (40.0, 0.0, 0.0)
    assert np.array_equal(np.asarray(data) > 0, labels == 3)
    assert meta["features"]["index"].tolist() == [1, 2]
    assert meta["features"]["volume_nm3"].tolist() == pytest.approx([4 * 8 * 8 * 128, 5 * 10 * 6 * 128])
    saved = read_table_csv((path / "instances" / "measurements.csv").read_text())
    assert saved["class_name"].tolist() == ["mito", "mito"]


def test_a_cancelled_run_keeps_the_previous_objects(tmp_path):
    labels = np.ones((16, 32, 32), np.uint8)
    labels[2:6, 4:12, 4:12] = 3
    path = tmp_path / "pred.zarr"
    _prediction(path, labels)
    drive(objects_in_prediction(path, ObjectSettings(3), block_shape=(8, 16, 16)))
    before = (path / "instances" / "measurements.csv").read_text()
    run = objects_in_prediction(path, ObjectSettings((2, 3)), block_shape=(8, 16, 16))
    next(run), next(run)
    run.close()  # Cancel mid-way
    assert (path / "instances" / "measurements.csv").read_text() == before
    assert [p.name for p in path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("make, expected", [
    (lambda p: ObjectSettings(()), "one or more label values"),
    (lambda p: ObjectSettings(0), "one or more label values"),
    (lambda p: ObjectSettings(3, min_size_nm3=-1), "min size"),
    (lambda p: ObjectSettings(3, min_size_nm3="abc"), "min size"),
    (lambda p: ObjectSettings(3, split_depth_nm=float("nan")), "split depth"),
    (lambda p: parse_classes("3,nucleus", ["background", "membrane", "mito"]), "'nucleus'"),
    (lambda p: drive(objects_in_prediction(p, ObjectSettings(7))), "class 7 does not exist"),
    (lambda p: drive(objects_in_prediction(p / "labels" / "zarr.json", ObjectSettings(3))), "is a file"),
    (lambda p: drive(objects_in_prediction(p.parent, ObjectSettings(3))), "not a dinofuse prediction"),
])
def test_bad_object_settings_and_folders_are_refused_clearly(tmp_path, make, expected):
    labels = np.ones((4, 8, 8), np.uint8)
    path = tmp_path / "pred.zarr"
    _prediction(path, labels)
    with pytest.raises(InputError, match=expected):
        make(path)
    assert not (path / "instances").exists()


def test_a_prediction_without_probabilities_is_refused(tmp_path):
    import shutil

    path = tmp_path / "pred.zarr"
    _prediction(path, np.ones((4, 8, 8), np.uint8))
    shutil.rmtree(path / "probabilities")
    with pytest.raises(InputError, match="no probabilities"):
        drive(objects_in_prediction(path, ObjectSettings(2)))


def test_saved_results_reopen_in_place_and_a_cancelled_save_leaves_nothing(tmp_path, monkeypatch):
    import napari_dinofuse.inference.outputs as outputs
    from napari_dinofuse._napari.reader import read
    from napari_dinofuse.inference.outputs import save_results
    from napari_dinofuse.progress import CANCELLED, cancellable

    labels = np.ones((12, 20, 24), np.uint8)
    labels[2:6, 4:12, 4:12] = 2
    grid = Grid(labels.shape, (8.0, 4.0, 4.0), (40.0, 8.0, 0.0))
    objects, table = _objects(labels, ObjectSettings(2), grid.voxel_size, grid.offset)
    images = {"labels": (labels, grid), "instances": (objects, grid)}
    monkeypatch.setattr(outputs, "SAVE_SLAB_BYTES", 20 * 24)  # one plane a step: several steps to cancel between

    steps = []
    cancelled = drive(cancellable(save_results(tmp_path / "r.zarr", images, ["bg", "mito"], table),
                                  lambda: len(steps) > 2), steps.append)
    assert cancelled is CANCELLED and list(tmp_path.iterdir()) == []  # nothing half-written, nothing left aside

    folder = drive(save_results(tmp_path / "r.zarr", images, ["bg", "mito"], table))
    layers = {meta["name"]: (data, meta) for data, meta, _ in read(str(folder))}
    assert set(layers) == {"prediction", "instances"}
    assert np.array_equal(np.asarray(layers["prediction"][0]), labels)
    assert layers["prediction"][1]["translate"] == (40.0, 8.0, 0.0) and list(layers["prediction"][1]["features"]
                                                                            ["class"]) == ["unpainted", "bg", "mito"]
    assert np.array_equal(np.asarray(layers["instances"][0]), objects)
    assert layers["instances"][1]["features"]["voxels"].tolist() == [4 * 8 * 8]

    (tmp_path / "notes").mkdir()
    with pytest.raises(InputError, match="not a dinofuse prediction"):
        drive(save_results(tmp_path / "notes", images))
    with pytest.raises(InputError, match="no prediction"):
        drive(save_results(tmp_path / "x.zarr", {"instances": (objects, grid)}))
