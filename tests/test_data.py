"""Built-in data: the MNIST-1D cache, the IDX loader with its checksums, one_hot."""

import gzip
import hashlib
import io
import random

import numpy as np
import pytest

import jbp

from jbp import data as jdata
from jbp.data import Dataset, FileCheck, load_mnist, load_mnist1d, one_hot


@pytest.fixture(scope="session")
def rng_states_around_generation(tmp_path_factory):
    """Generate MNIST-1D once; the global RNG states before and after, and the data."""
    folder = tmp_path_factory.getbasetemp() / "jbp_cache"
    np.random.seed(123)
    random.seed(123)
    before = np.random.get_state(), random.getstate()
    if (folder / jdata.MNIST1D_FILE).exists():  # another test file cached it first
        jdata.generate_mnist1d()
    else:
        load_mnist1d(folder)  # generates and caches
    return before, (np.random.get_state(), random.getstate()), folder


@pytest.fixture(scope="session")
def mnist1d_cache(rng_states_around_generation):
    """One MNIST-1D cache folder for the whole test run (generated at most once)."""
    return rng_states_around_generation[2]


@pytest.fixture
def counting_generator(monkeypatch, mnist1d_cache):
    """Replace the (slow) generator by one that returns the cached set and counts calls."""
    cached = load_mnist1d(mnist1d_cache)
    calls = []

    def fake():
        calls.append(1)
        return cached

    monkeypatch.setattr(jdata, "generate_mnist1d", fake)
    return calls


# ---------------------------------------------------------------------------- MNIST-1D

def test_mnist1d_shapes_dtypes_and_labels(mnist1d_cache):
    d = load_mnist1d(mnist1d_cache)
    assert isinstance(d, Dataset)
    assert d.x_train.shape == (4000, 40) and d.x_train.dtype == np.float32
    assert d.y_train.shape == (4000,) and d.y_train.dtype == np.int32
    assert d.x_test.shape == (1000, 40) and d.x_test.dtype == np.float32
    assert d.y_test.shape == (1000,) and d.y_test.dtype == np.int32
    assert set(np.unique(d.y_train)) == set(range(10))
    assert abs(float(d.x_train.mean())) < 0.05 and abs(float(d.x_train.std()) - 1) < 0.05


def test_mnist1d_cache_round_trip_is_identical(mnist1d_cache, counting_generator):
    a, b = load_mnist1d(mnist1d_cache), load_mnist1d(mnist1d_cache)
    assert counting_generator == []  # served from the cache, not regenerated
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_mnist1d_generation_leaves_global_rngs_alone(rng_states_around_generation):
    (np_before, py_before), (np_after, py_after), _ = rng_states_around_generation
    assert np_after[0] == np_before[0] and np.array_equal(np_after[1], np_before[1])
    assert np_after[2:] == np_before[2:]
    assert py_after == py_before


def _corrupt_truncate(path):
    path.write_bytes(path.read_bytes()[:1000])


def _corrupt_flip_byte(path):
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def _corrupt_wrong_digest(path):
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["x_train"] = arrays["x_train"] + 1  # valid zip, stale digest
    np.savez(path, **arrays)


def _corrupt_wrong_shape(path):
    arrays = load_mnist1d(path.parent)._asdict()
    arrays["x_train"] = arrays["x_train"][:10]
    jdata._save_npz(path, arrays)  # consistent digest, wrong shape


@pytest.mark.parametrize("corrupt", [_corrupt_truncate, _corrupt_flip_byte,
                                     _corrupt_wrong_digest, _corrupt_wrong_shape])
def test_corrupt_mnist1d_cache_is_regenerated(tmp_path, mnist1d_cache, counting_generator,
                                              corrupt):
    path = tmp_path / jdata.MNIST1D_FILE
    path.write_bytes((mnist1d_cache / jdata.MNIST1D_FILE).read_bytes())
    corrupt(path)
    d = load_mnist1d(tmp_path)
    assert counting_generator == [1]
    np.testing.assert_array_equal(d.x_train, load_mnist1d(mnist1d_cache).x_train)
    load_mnist1d(tmp_path)  # the rewritten cache is good again
    assert counting_generator == [1]


def test_cache_dir_from_argument_env_and_default(tmp_path, monkeypatch, counting_generator):
    monkeypatch.setenv("JBP_CACHE", str(tmp_path / "env"))
    assert jdata.resolve_cache_dir() == tmp_path / "env"
    assert jdata.resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    load_mnist1d()
    assert (tmp_path / "env" / jdata.MNIST1D_FILE).exists()
    monkeypatch.delenv("JBP_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert jdata.resolve_cache_dir() == tmp_path / "xdg" / "jbp"


# ---------------------------------------------------------------------------- one_hot

def test_one_hot():
    out = one_hot(np.array([0, 2, 1], np.int32), 3)
    np.testing.assert_array_equal(out, np.eye(3, dtype=np.float32)[[0, 2, 1]])
    assert out.dtype == np.float32
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        one_hot(np.array([0, 3]), 3)
    with pytest.raises(ValueError, match="integers"):
        one_hot(np.array([0.5]), 3)


# ---------------------------------------------------------------------------- MNIST IDX

def _idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def _write_mnist(folder, n_train=6, n_test=4, seed=0):
    """Write tiny MNIST-shaped IDX files; return the arrays and checks of their digests."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte.gz": (rng.integers(0, 256, (n_train, 28, 28)), 2051),
        "train-labels-idx1-ubyte.gz": (rng.integers(0, 10, (n_train,)), 2049),
        "t10k-images-idx3-ubyte.gz": (rng.integers(0, 256, (n_test, 28, 28)), 2051),
        "t10k-labels-idx1-ubyte.gz": (rng.integers(0, 10, (n_test,)), 2049),
    }
    folder.mkdir(parents=True, exist_ok=True)
    checks = {}
    for name, (a, magic) in arrays.items():
        raw = _idx_bytes(a, magic)
        (folder / name).write_bytes(raw)
        checks[name] = FileCheck(len(raw), hashlib.sha256(raw).hexdigest())
    return {k: v[0] for k, v in arrays.items()}, checks


def test_load_mnist_reads_verified_idx_files(tmp_path):
    arrays, checks = _write_mnist(tmp_path)
    d = load_mnist(tmp_path, checks=checks)
    assert d.x_train.shape == (6, 28, 28) and d.x_train.dtype == np.float32
    assert d.y_test.shape == (4,) and d.y_test.dtype == np.int32
    np.testing.assert_allclose(d.x_train, arrays["train-images-idx3-ubyte.gz"] / 255.0,
                               rtol=1e-6)
    np.testing.assert_array_equal(d.y_train, arrays["train-labels-idx1-ubyte.gz"])
    assert 0.0 <= d.x_test.min() and d.x_test.max() <= 1.0


def test_load_mnist_rejects_truncated_file_by_name(tmp_path):
    _, checks = _write_mnist(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz.*bytes"):
        load_mnist(tmp_path, checks=checks)


def test_load_mnist_rejects_corrupt_file_by_name(tmp_path):
    _, checks = _write_mnist(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x01  # same size, different content
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz.*sha256"):
        load_mnist(tmp_path, checks=checks)


def test_load_mnist_checks_published_digests_by_default(tmp_path):
    _write_mnist(tmp_path)  # tiny files: not the published ones
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz: expected 9912422 bytes"):
        load_mnist(tmp_path)


def test_load_mnist_missing_folder_and_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mnist(tmp_path / "nowhere")
    _, checks = _write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.gz is missing"):
        load_mnist(tmp_path, checks=checks)


def _rewrite(folder, checks, name, raw):
    (folder / name).write_bytes(raw)
    checks[name] = FileCheck(len(raw), hashlib.sha256(raw).hexdigest())


def test_load_mnist_rejects_bad_idx_content_with_verified_digest(tmp_path):
    _, checks = _write_mnist(tmp_path)
    name = "train-images-idx3-ubyte.gz"
    _rewrite(tmp_path, checks, name, _idx_bytes(np.zeros((6, 28, 28)), 2049))
    with pytest.raises(ValueError, match=f"{name}: IDX magic 2049, expected 2051"):
        load_mnist(tmp_path, checks=checks)
    header = (2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (6, 28, 28))
    _rewrite(tmp_path, checks, name, gzip.compress(header + bytes(100)))
    with pytest.raises(ValueError, match=f"{name}: IDX dimensions"):
        load_mnist(tmp_path, checks=checks)
    _rewrite(tmp_path, checks, name, b"not gzip at all")
    with pytest.raises(ValueError, match=f"{name}: not a readable gzip"):
        load_mnist(tmp_path, checks=checks)
    _rewrite(tmp_path, checks, name, _idx_bytes(np.zeros((5, 28, 28)), 2051))
    with pytest.raises(ValueError, match="5 images but 6 labels"):
        load_mnist(tmp_path, checks=checks)


def test_download_verifies_and_falls_back_to_the_next_mirror(tmp_path, monkeypatch):
    _, checks = _write_mnist(tmp_path / "src")
    served = {name: (tmp_path / "src" / name).read_bytes() for name in checks}
    bad_mirror = jdata.MNIST_MIRRORS[0]
    fetched = []

    def fake_urlopen(url, timeout):
        fetched.append(url)
        if url.startswith(bad_mirror):
            return io.BytesIO(b"a corrupt download")
        return io.BytesIO(served[url.rsplit("/", 1)[1]])

    monkeypatch.setattr(jdata.urllib.request, "urlopen", fake_urlopen)
    d = load_mnist(tmp_path / "dl", download=True, checks=checks)
    assert d.x_train.shape == (6, 28, 28)
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == sorted(checks)
    assert len(fetched) == 8  # each file: the bad mirror, then the good one
    load_mnist(tmp_path / "dl", checks=checks)  # now offline


def test_download_names_the_file_when_every_mirror_fails(tmp_path, monkeypatch):
    _, checks = _write_mnist(tmp_path / "src")
    monkeypatch.setattr(jdata.urllib.request, "urlopen",
                        lambda url, timeout: io.BytesIO(b"not it"))
    with pytest.raises(RuntimeError, match="could not download train-images-idx3-ubyte.gz"):
        load_mnist(tmp_path / "dl", download=True, checks=checks)
    assert not list((tmp_path / "dl").iterdir())  # nothing half-written left behind


def test_mnist1d_with_a_channel_axis_feeds_a_cnn_and_a_gru(mnist1d_cache):
    flat, d = load_mnist1d(mnist1d_cache), load_mnist1d(mnist1d_cache, channels=True)
    assert d.x_train.shape == (4000, 40, 1) and d.x_test.shape == (1000, 40, 1)
    np.testing.assert_array_equal(d.x_train[..., 0], flat.x_train)
    np.testing.assert_array_equal(d.y_test, flat.y_test)
    for model in (jbp.serial(jbp.conv(2, 5), jbp.global_avg_pool(), jbp.dense(10)),
                  jbp.serial(jbp.gru(3, return_sequences=False), jbp.dense(10))):
        assert jbp.layer.out_shape(model, d.x_train.shape[1:]) == (10,)
    with pytest.raises(ValueError, match="channels must be True or False, got 1"):
        load_mnist1d(mnist1d_cache, channels=1)
