"""Blockwise feature extraction, prediction and objects on a dask.distributed cluster.

The driver plans; workers compute. Everything a task needs travels as a small :class:`Job` (paths and
settings, no arrays): each worker process opens the volumes, the feature cache entries and the model once
and keeps them for all its tasks. Two phases:

1. **features**: the missing units of the raw's and the context's cache entries are filled by tasks of a
   few slices each (units are independent, written data-then-marker: see ``features/cache.py``);
2. **prediction**: one task per block of :func:`~napari_dinofuse.inference.plan.plan_prediction`. A task writes its
   block's core into every output of the OME-Zarr (chunks follow the blocks, so no two tasks share a chunk),
   then a completion record ``OUT.zarr/.blocks/<index>``. A task retried after its worker died writes the
   same bytes; a rerun of the command skips blocks that have a record. The output is marked complete when
   every block is.

Unlike the single-process :class:`~napari_dinofuse.inference.outputs.ZarrSink`, the output is written in place (that is
what makes a 10-hour run restartable); ``complete`` in its ``dinofuse`` attributes tells a finished one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Generator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import defaults
from .errors import InputError
from .progress import Progress, drive

# Per worker process: opened volumes, entries, models and plans, keyed by job (loaded once, not per task).
_WORKER_CACHE: dict = {}


@dataclass(frozen=True)
class VolumeRef:
    """How a worker opens a volume by itself."""

    path: str
    voxel_size: tuple | None = None
    offset: tuple | None = None
    level: int = 0
    name: str = "raw"

    def open(self):
        from .io import open_volume

        return open_volume(self.path, voxel_size=self.voxel_size, offset=self.offset, name=self.name,
                           level=self.level)


@dataclass(frozen=True)
class Job:
    raw: VolumeRef
    context: VolumeRef | None
    model: str
    out: str
    raw_entry: str
    context_entry: str | None
    backbone: str
    normalization: str
    roi: str | None = None
    tile_shape: tuple = defaults.PREDICT_TILE
    overlap: tuple = defaults.PREDICT_OVERLAP
    block_shape: tuple = defaults.PREDICT_BLOCK
    attention: bool = True
    device: str = "auto"
    batch_size: int = 4
    fault_once: str | None = field(default=None, compare=False)  # test hook: a worker dies once, here

    @property
    def key(self) -> str:
        """Identity of the result: same key, same bytes (restart and retry reuse finished blocks)."""
        fields = asdict(self)
        fields.pop("fault_once")
        weights = Path(self.model) / "model.safetensors"
        fields["weights"] = [weights.stat().st_size, weights.stat().st_mtime_ns] if weights.exists() else None
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:24]


# -- worker side -------------------------------------------------------------------------------------------

def _worker_threads() -> int:
    try:
        from distributed import get_worker

        return max(1, get_worker().state.nthreads)
    except (ImportError, ValueError, AttributeError):
        return max(1, os.cpu_count() or 1)


def _backbone(spec: str, normalization: str, device: str):
    key = ("backbone", spec, normalization, device)
    if key not in _WORKER_CACHE:
        import warnings

        from .features.backbone import load_backbone

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the driver already said it if the backbone is random
            _WORKER_CACHE[key] = load_backbone(spec, device=device, normalization=normalization)
    return _WORKER_CACHE[key]


def _source_and_plan(job: Job, model):
    """The job's features and block plan; deterministic, so driver and workers agree block for block."""
    from .features.cache import FeatureEntry
    from .features.extract import FeatureSource
    from .inference.plan import plan_prediction

    context = job.context.open() if job.context else None
    source = FeatureSource(job.raw.open(), FeatureEntry(Path(job.raw_entry)), context,
                           FeatureEntry(Path(job.context_entry)) if job.context_entry else None)
    plan = plan_prediction(model, source, job.roi, tile_shape=job.tile_shape, overlap=job.overlap,
                           block_shape=job.block_shape, attention=job.attention)
    return source, plan


def _predict_state(job: Job):
    key = ("predict", job.key)
    if key not in _WORKER_CACHE:
        import torch
        import zarr

        from .features.backbone import resolve_device
        from .modeling.checkpoint import load_model

        dev = resolve_device(job.device)
        if dev.type == "cpu":
            torch.set_num_threads(_worker_threads())  # workers share the machine's cores
        model, _ = load_model(job.model, device=dev)
        source, plan = _source_and_plan(job, model)
        arrays = {name: zarr.open_array(str(Path(job.out) / name / "0"), mode="r+") for name, *_ in plan.outputs()}
        _WORKER_CACHE[key] = (model, source, plan, dev, arrays)
    return _WORKER_CACHE[key]


def extract_task(volume: VolumeRef, entry_path: str, plane: str, units: list[int], backbone: str,
                 normalization: str, device: str, batch_size: int) -> int:
    """Fill some units of a feature cache entry; returns how many."""
    from .features.cache import FeatureEntry
    from .features.extract import fill_units

    key = ("volume", volume)
    if key not in _WORKER_CACHE:
        _WORKER_CACHE[key] = volume.open()
    entry = FeatureEntry(Path(entry_path))
    todo = sorted(set(units) - entry.done_units(plane))
    drive(fill_units(_WORKER_CACHE[key], _backbone(backbone, normalization, device), entry, plane, todo, batch_size))
    return len(todo)


def predict_task(job: Job, index: int) -> float:
    """Compute block ``index`` and write it, then its completion record; returns the seconds it took."""
    import time

    from .atomic import atomic_write_text
    from .inference.predict import predict_block_retrying

    record = Path(job.out) / ".blocks" / f"{index:07d}"
    if record.exists():  # finished by an earlier attempt
        return 0.0
    start = time.perf_counter()
    if job.fault_once and not os.path.exists(job.fault_once):
        Path(job.fault_once).write_text("killed")
        os._exit(1)  # a worker dying mid-task (fault injection in tests)
    model, source, plan, dev, arrays = _predict_state(job)
    results, used = drive(predict_block_retrying(model, source, plan, index, dev))
    if used is not plan:  # out of memory once: this worker's next blocks keep the smaller tiles
        _WORKER_CACHE[("predict", job.key)] = (model, source, used, dev, arrays)
    for name, region, array in results:
        arrays[name][(Ellipsis, *region)] = array
    atomic_write_text(record, job.key)
    return time.perf_counter() - start


# -- driver side -------------------------------------------------------------------------------------------

def prepare_output(job: Job, plan, class_names=None) -> set[int]:
    """Create ``job.out`` for ``plan`` (or reuse the one an interrupted run of the same job left), naming the
    classes as :func:`~napari_dinofuse.inference.predict.predict` does; returns the blocks already done."""
    import zarr

    from .inference.outputs import ZarrSink, require_group
    from .inference.predict import class_names_info
    from .io import create_ome_image

    named = class_names_info(class_names, plan.num_classes)
    out = Path(job.out)
    attrs = {}
    if out.exists():
        ZarrSink(out)  # refuses a path that holds anything but an earlier dinofuse prediction
        attrs = dict(zarr.open_group(str(out), mode="r").attrs.get("dinofuse", {}))
    if attrs.get("job") == job.key:
        records = out / ".blocks"
        return {int(p.name) for p in records.iterdir() if not p.name.startswith(".")} if records.is_dir() else set()
    if out.exists():
        shutil.rmtree(out)  # an earlier prediction of another job
    root = zarr.open_group(str(out), mode="w", zarr_format=3)
    for name, shape, dtype, grid, chunks in plan.outputs():
        create_ome_image(require_group(root, name), name, shape, dtype, grid, chunks)
    (out / ".blocks").mkdir()
    root.attrs["dinofuse"] = {"kind": ZarrSink.KIND, "outputs": [o[0] for o in plan.outputs()], "job": job.key,
                              "blocks": len(plan.blocks), "complete": False, "num_classes": plan.num_classes,
                              "labels": defaults.PREDICTION_LABELS, **named}
    return set()


def prepare_job(raw: VolumeRef, context: VolumeRef | None, model_dir, out, backbone, cache, *, planes: str = "xy",
                **settings) -> tuple[Job, list[tuple]]:
    """The :class:`Job` for predicting ``raw`` with the model in ``model_dir`` into ``out``, and the feature
    units still missing in ``cache`` (a folder every worker can reach, e.g. on a shared file system)."""
    from .features.extract import missing_units, open_entry

    raw_volume = raw.open()
    context_volume = context.open() if context is not None else None
    if context_volume is not None:
        context_volume.require_covers(raw_volume)
    entries = [open_entry(v, backbone, cache, planes=planes) if v is not None else None
               for v in (raw_volume, context_volume)]
    extraction = [(r, str(e.path), plane, units) for r, e in zip((raw, context), entries) if e is not None
                  for plane, units in missing_units(e).items() if units]
    job = Job(raw=raw, context=context, model=str(Path(model_dir).absolute()), out=str(Path(out).absolute()),
              raw_entry=str(entries[0].path), context_entry=str(entries[1].path) if entries[1] else None,
              backbone=str(backbone.spec), normalization=backbone.normalization, **settings)
    return job, extraction


def connect(workers: int | None = None, scheduler: str | None = None):
    """A client to an existing scheduler, or to a new local cluster of ``workers`` processes."""
    from distributed import Client, LocalCluster

    if scheduler:
        return Client(scheduler)
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0")
    return Client(cluster)


def run_blockwise(client, job: Job, extraction: list[tuple]) -> Generator[Progress, None, dict]:
    """Fill missing feature units, then predict every block not yet done; returns counts.

    ``extraction``: (VolumeRef, entry path, plane, units) tuples still to compute. Closing the generator
    cancels what has not run; finished blocks keep their records for the next run.
    """
    from distributed import as_completed

    from .modeling.checkpoint import load_model

    futures = []
    try:
        batches = [(ref, path, plane, units[i:i + 4 * job.batch_size])
                   for ref, path, plane, units in extraction for i in range(0, len(units), 4 * job.batch_size)]
        futures = [client.submit(extract_task, ref, path, plane, units, job.backbone, job.normalization,
                                 job.device, job.batch_size, pure=False, retries=3)
                   for ref, path, plane, units in batches]
        for done, _ in enumerate(as_completed(futures), 1):
            yield Progress(done, len(futures), "features")

        model, info = load_model(job.model)
        _, plan = _source_and_plan(job, model)
        finished = prepare_output(job, plan, info.class_names)
        todo = [i for i in range(len(plan.blocks)) if i not in finished]
        futures = [client.submit(predict_task, job, i, pure=False, retries=3) for i in todo]
        task_seconds = 0.0
        for done, future in enumerate(as_completed(futures), 1):
            task_seconds += future.result()
            yield Progress(done, len(futures), f"blocks ({len(finished)} already done)")
    except BaseException:
        client.cancel(futures)
        raise
    import zarr

    root = zarr.open_group(job.out, mode="r+")
    root.attrs["dinofuse"] = {**dict(root.attrs["dinofuse"]), "complete": True}
    return {"blocks": len(plan.blocks), "computed": len(todo), "skipped": len(finished),
            "task_seconds": task_seconds}


def block_mapper(client):
    """``map_blocks`` for :func:`~napari_dinofuse.inference.instances.find_objects` on ``client``'s cluster: one
    task per block, results in block order; closing it cancels what has not run. No retries: a block task that rewrites
    ids in place must not run twice (a lost worker fails the run, which leaves the previous objects as they were)."""

    def map_blocks(task, items):
        futures = client.map(task, list(items), pure=False)
        try:
            for future in futures:
                yield future.result()
        finally:
            client.cancel(futures)

    return map_blocks


def require_distributed() -> None:
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise InputError("--workers/--scheduler need dask.distributed: pip install distributed") from None
