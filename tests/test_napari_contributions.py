"""The reader and sample data as napari uses them: a real viewer (Xvfb), layers placed in the world."""

import numpy as np
import pytest

from napari_dinofuse.synthetic.sample import make_sample


@pytest.fixture(scope="module")
def sample():
    return make_sample(seed=0)


def test_sample_data_opens_raw_and_context_aligned(make_napari_viewer, sample):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-dinofuse", "synthetic_em")
    raw, context = viewer.layers["raw"], viewer.layers["context"]
    assert np.allclose(raw.scale, sample.raw.voxel_size) and np.allclose(context.scale, sample.context.voxel_size)
    assert np.allclose(raw.translate, sample.raw.offset) and np.allclose(context.translate, sample.context.offset)
    # Both layers cover the same physical place: the raw's world extent lies inside the context's.
    raw_lo, raw_hi = raw.extent.world
    ctx_lo, ctx_hi = context.extent.world
    assert np.all(raw_lo >= ctx_lo) and np.all(raw_hi <= ctx_hi)
    assert "ground truth" not in viewer.layers  # offered separately
    viewer.open_sample("napari-dinofuse", "synthetic_em_ground_truth")
    truth = viewer.layers["ground truth"]
    assert truth.data.shape == raw.data.shape and np.allclose(truth.translate, raw.translate)
    from napari_dinofuse.display import class_color

    # The class colours of the annotations and predictions, the EM visible through the background.
    assert np.allclose(truth.colormap.map(np.array([2, 3])), [class_color(2), class_color(3)])
    assert truth.colormap.map(np.array([1]))[0][3] == 0
    assert list(truth.features["class"])[:5] == ["unpainted", *sample.class_names[1:5]]


def test_reader_places_volumes_and_predictions(make_napari_viewer, sample, tmp_path, tiny_backbone):
    import zarr

    from napari_dinofuse.features.cache import FeatureCache
    from napari_dinofuse.features.extract import extract_sources
    from napari_dinofuse.inference.outputs import ZarrSink
    from napari_dinofuse.inference.predict import predict
    from napari_dinofuse.progress import drive
    from napari_dinofuse.training.train import new_model

    group = zarr.open_group(str(tmp_path / "raw.zarr"), mode="w")
    group.create_array("0", data=np.asarray(sample.raw.data))
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"],
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": list(sample.raw.voxel_size)},
            {"type": "translation", "translation": list(sample.raw.offset)}]}]}]}
    source = drive(extract_sources(sample.raw, sample.context, tiny_backbone, FeatureCache(tmp_path / "c")))
    model = new_model(source, 4, base_channels=4)
    roi = (slice(0, 16), slice(16, 80), slice(0, 64))
    names = ["background", "membrane", "mitochondrion", "granule"]
    drive(predict(model, source, roi, tile_shape=(16, 64, 64), overlap=(8, 16, 16),
                  sink=ZarrSink(tmp_path / "result.zarr"), class_names=names))
    with pytest.raises(ValueError, match="3 class names for a model of 4 classes"):
        drive(predict(model, source, roi, sink=ZarrSink(tmp_path / "other.zarr"), class_names=names[:3]))
    assert not (tmp_path / "other.zarr").exists()

    viewer = make_napari_viewer()
    viewer.open(str(tmp_path / "raw.zarr"), plugin="napari-dinofuse")
    viewer.open(str(tmp_path / "result.zarr"), plugin="napari-dinofuse")
    raw, prediction = viewer.layers["raw"], viewer.layers["prediction"]
    assert np.allclose(raw.scale, sample.raw.voxel_size) and np.allclose(raw.translate, sample.raw.offset)
    assert prediction.data.shape == (16, 64, 64) and np.allclose(prediction.scale, raw.scale)
    # The ROI's first voxel sits on raw voxel (0, 16, 0): same world position in both layers.
    assert np.allclose(prediction.data_to_world((0, 0, 0)), raw.data_to_world((0, 16, 0)))
    level3 = viewer.layers["attention level 3"]
    assert np.allclose(level3.scale, np.asarray(raw.scale) * 4) and level3.blending == "additive"
    # A level-3 voxel covers 4x4x4 raw voxels: its centre is 1.5 raw voxels past the first one's.
    assert np.allclose(level3.data_to_world((0, 0, 0)), raw.data_to_world((1.5, 17.5, 1.5)))
    # Styled as in the dock: transparent background; a fixed gate range with 0.5 (neutral) adding no tint.
    assert prediction.colormap.map(np.array([1]))[0][3] == 0
    assert tuple(level3.contrast_limits) == (0.0, 1.0)
    assert np.allclose(level3.colormap.map(np.array([0.5]))[0][:3], 0)
    # The model's class names come with the prediction: the status bar names the class under the cursor.
    assert list(prediction.features["class"]) == ["unpainted", *names]



def test_reader_opens_each_volume_of_an_hdf5_file(make_napari_viewer, tmp_path):
    """napari hands over the file only (it refuses `file.h5/volumes/raw`, which is no file): one layer per volume."""
    import h5py

    with h5py.File(tmp_path / "sample_A.h5", "w") as f:
        raw = f.create_dataset("volumes/raw", data=np.zeros((4, 16, 16), np.uint8))
        raw.attrs["resolution"], raw.attrs["offset"] = [40.0, 4.0, 4.0], [80.0, 8.0, 12.0]
        labels = f.create_dataset("volumes/labels/neuron_ids", data=np.zeros((4, 16, 16), np.uint64))
        labels.attrs["resolution"], labels.attrs["offset"] = [40.0, 4.0, 4.0], [80.0, 8.0, 12.0]
        f.create_dataset("annotations/locations", data=np.zeros((3, 3)))  # not a volume: no layer
    viewer = make_napari_viewer()
    viewer.open(str(tmp_path / "sample_A.h5"), plugin="napari-dinofuse")
    assert [layer.name for layer in viewer.layers] == ["neuron_ids", "raw"]
    for layer in viewer.layers:
        assert np.allclose(layer.scale, (40, 4, 4)) and np.allclose(layer.translate, (80, 8, 12))
    assert isinstance(viewer.layers["raw"].data, h5py.Dataset)  # napari reads the slices it shows


def test_labels_saved_with_the_writer_open_again_as_labels_in_place(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    strokes = np.zeros((6, 20, 30), np.uint8)
    strokes[2, 5:9, 4:20] = 2
    strokes[4, 10:12, 3:7] = 1
    layer = viewer.add_labels(strokes, name="annotations", scale=(8.0, 4.0, 4.0), translate=(16.0, 0.0, 40.0))
    written = layer.save(str(tmp_path / "strokes.zarr"), plugin="napari-dinofuse")  # File > Save Selected Layers
    assert written == [str(tmp_path / "strokes.zarr")]
    again = viewer.open(str(tmp_path / "strokes.zarr"), plugin="napari-dinofuse")[0]
    assert again._type_string == "labels" and np.array_equal(np.asarray(again.data), strokes)
    assert np.allclose(again.scale, layer.scale) and np.allclose(again.translate, layer.translate)
    # Saving again replaces its own earlier file; a folder it did not write is refused and left as it was.
    layer.data[0, 0, 0] = 1
    layer.save(str(tmp_path / "strokes.zarr"), plugin="napari-dinofuse")
    assert viewer.open(str(tmp_path / "strokes.zarr"), plugin="napari-dinofuse")[0].data[0, 0, 0] == 1
    (tmp_path / "mine.zarr").mkdir()
    (tmp_path / "mine.zarr" / "notes.txt").write_text("keep")
    with pytest.raises(Exception, match="not written by napari-dinofuse"):
        layer.save(str(tmp_path / "mine.zarr"), plugin="napari-dinofuse")
    assert [p.name for p in (tmp_path / "mine.zarr").iterdir()] == ["notes.txt"]
