"""`dinofuse extract` and `dinofuse cache` end to end, as a user runs them."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

DINOFUSE = str(Path(sys.executable).with_name("dinofuse"))


def _run(*args, cwd=None):
    return subprocess.run([DINOFUSE, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.fixture
def volumes(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "raw.npy", rng.integers(0, 256, (4, 64, 80), dtype=np.uint8))
    np.save(tmp_path / "context.npy", rng.integers(0, 256, (2, 20, 20), dtype=np.uint8))
    return tmp_path


def _flags(d, cache):
    return ["--raw", d / "raw.npy", "--raw-voxel-size", "4", "--context", d / "context.npy",
            "--context-voxel-size", "64", "--backbone", "random:tiny", "--device", "cpu", "--cache", cache]


def test_extract_then_reuse_then_list_and_clear(volumes):
    cache = volumes / "cache"
    first = _run("extract", *_flags(volumes, cache))
    assert first.returncode == 0, first.stderr
    assert "RANDOM" in first.stderr + first.stdout  # never silent about fake features
    assert "raw: features (64, 4, 4, 5)" in first.stdout and "context: features (64, 2, 2, 2)" in first.stdout
    second = _run("extract", *_flags(volumes, cache))
    assert second.returncode == 0 and second.stderr.count("found in the cache") == 2
    listing = _run("cache", "list", "--cache", cache)
    assert listing.returncode == 0 and "2 entries" in listing.stdout and "100.0%" in listing.stdout
    cleared = _run("cache", "clear", "--cache", cache)
    assert cleared.returncode == 0 and "freed" in cleared.stdout
    assert "0 entries" in _run("cache", "list", "--cache", cache).stdout


@pytest.mark.parametrize("problem, expected", [
    ("nan", "NaN"),
    ("flat", "2D"),
    ("no-context-size", "--context-voxel-size"),
    ("missing", "no such file"),
    ("not-covering", "does not cover"),
    ("bad-size", "Z,Y,X"),
])
def test_bad_input_gives_one_line_and_nonzero_exit(volumes, problem, expected):
    d = volumes
    args = _flags(d, d / "cache")
    if problem == "nan":
        np.save(d / "raw.npy", np.full((2, 32, 32), np.nan, np.float32))
    elif problem == "flat":
        np.save(d / "raw.npy", np.zeros((32, 32), np.uint8))
    elif problem == "no-context-size":
        i = args.index("--context-voxel-size")
        del args[i:i + 2]
    elif problem == "missing":
        args[1] = d / "nope.npy"
    elif problem == "not-covering":
        args += ["--context-offset", "5000,0,0"]
    elif problem == "bad-size":
        args[3] = "4,4"
    result = _run("extract", *args)
    assert result.returncode != 0
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if "error" in line]) == 1


def test_extract_verify_rechecks_every_unit_and_repairs(volumes):
    import os

    from napari_dinofuse.features.cache import FeatureCache, FeatureEntry

    cache = volumes / "cache"
    assert _run("extract", *_flags(volumes, cache)).returncode == 0
    entry = next(FeatureEntry(e.path) for e in FeatureCache(cache).entries() if e.source == "raw")
    good = entry.read()
    (victim,) = entry._chunk_files("xy", 1)
    st = victim.stat()
    raw = bytearray(victim.read_bytes())
    raw[10] ^= 0xFF  # bit rot that leaves size and mtime alone: only a full check (or a read) sees it
    victim.write_bytes(bytes(raw))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _run("extract", *_flags(volumes, cache)).returncode == 0
    assert 1 in entry.done_units("xy") and entry.path.exists()  # not seen by the stat check ...
    again = _run("extract", *_flags(volumes, cache), "--verify")  # ... but by the full one, and recomputed
    assert again.returncode == 0, again.stderr
    assert np.allclose(FeatureEntry(entry.path).read(), good, atol=1e-2)  # batch of 1 vs 4: BLAS rounding
