from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from sparsefl.config import DataConfig
from sparsefl.data import Dataset, load_dataset, make_partition
from sparsefl.errors import ConfigError, DataError
from sparsefl.registry import PARTITIONERS


def test_digits_is_normalised_with_held_out_test_split():
    d = load_dataset(DataConfig(), seed=0)
    assert d.input_shape == (1, 8, 8) and d.num_classes == 10
    assert len(d.x_train) + len(d.x_test) == 1797
    assert abs(float(d.x_train.mean())) < 1e-4
    assert set(d.y_test.tolist()) == set(range(10))


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "shards"])
def test_partitions_are_disjoint_complete_and_seeded(partition):
    labels = np.repeat(np.arange(10), 100)
    cfg = DataConfig(partition=partition, alpha=0.5, shards_per_client=2, min_samples=5)
    a = make_partition(labels, 20, cfg, seed=1)
    b = make_partition(labels, 20, cfg, seed=1)
    c = make_partition(labels, 20, cfg, seed=2)
    allidx = np.concatenate(a.train)
    assert len(allidx) == len(labels) == len(np.unique(allidx))
    assert all(np.array_equal(x, y) for x, y in zip(a.train, b.train))
    assert any(not np.array_equal(x, y) for x, y in zip(a.train, c.train))


def test_iid_sizes_differ_by_at_most_one():
    s = make_partition(np.zeros(1003, dtype=int), 10, DataConfig(partition="iid"), 0).sizes()
    assert max(s) - min(s) <= 1


def test_dirichlet_minimum_and_skew():
    labels = np.repeat(np.arange(10), 100)
    split = make_partition(labels, 10, DataConfig(partition="dirichlet", alpha=0.1, min_samples=20), 0)
    assert min(split.sizes()) >= 20
    hist = split.label_histogram(labels, 10)
    # alpha=0.1 is severe skew: most clients are dominated by few classes
    assert np.mean(hist.max(1) / hist.sum(1)) > 0.4


def test_shards_give_few_classes_per_client():
    labels = np.repeat(np.arange(10), 100)
    split = make_partition(labels, 20, DataConfig(partition="shards", shards_per_client=2), 0)
    hist = split.label_histogram(labels, 10)
    assert all((row > 0).sum() <= 3 for row in hist)


def test_validation_split():
    labels = np.repeat(np.arange(10), 50)
    split = make_partition(labels, 5, DataConfig(partition="iid", val_fraction=0.1), 0)
    for tr, va in zip(split.train, split.val):
        assert len(va) == 10 and not set(tr) & set(va)


def test_too_few_samples_for_the_partition():
    with pytest.raises(DataError, match="min_samples"):
        make_partition(np.zeros(50, dtype=int), 10, DataConfig(min_samples=10), 0)
    with pytest.raises(DataError, match="shards"):
        make_partition(np.zeros(10, dtype=int), 10, DataConfig(partition="shards", shards_per_client=2), 0)
    with pytest.raises(DataError, match="at least one sample"):
        make_partition(np.zeros(5, dtype=int), 10, DataConfig(partition="iid"), 0)


def test_fashion_mnist_missing_files_say_where_they_looked(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path)):
        load_dataset(DataConfig(name="fashion-mnist", dir=str(tmp_path)), 0)


def _idx(path, arr):
    arr = np.asarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 8, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


def test_fashion_mnist_idx_reader(tmp_path):
    rng = np.random.default_rng(0)
    _idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (20, 28, 28)))
    _idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(20) % 10)
    _idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (10, 28, 28)))
    _idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(10))
    d = load_dataset(DataConfig(name="fashion-mnist", dir=str(tmp_path)), 0)
    assert d.input_shape == (1, 28, 28) and len(d.x_train) == 20 and d.num_classes == 10
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x09" + b"\x00" * 3)
    )
    with pytest.raises(DataError, match="IDX body"):
        load_dataset(DataConfig(name="fashion-mnist", dir=str(tmp_path)), 0)


def test_npz_images_and_flat_features(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "d.npz"
    np.savez(
        p,
        x_train=rng.random((30, 3, 4, 4)),
        y_train=np.arange(30) % 3,
        x_test=rng.random((6, 3, 4, 4)),
        y_test=np.arange(6) % 3,
    )
    d = load_dataset(DataConfig(name="npz", dir=str(p)), 0)
    assert d.input_shape == (3, 4, 4) and d.num_classes == 3
    np.savez(
        p, x_train=rng.random((30, 5)), y_train=np.arange(30) % 3, x_test=rng.random((6, 5)), y_test=np.arange(6) % 3
    )
    assert load_dataset(DataConfig(name="npz", dir=str(p)), 0).input_shape == (5,)


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"x_train": np.zeros((3, 2))}, "lacks y_train"),
        (
            {
                "x_train": np.zeros((3, 2)),
                "y_train": np.array([0, 1, -1]),
                "x_test": np.zeros((1, 2)),
                "y_test": np.array([0]),
            },
            "labels",
        ),
        (
            {
                "x_train": np.zeros((3, 2)),
                "y_train": np.array([0, 1]),
                "x_test": np.zeros((1, 2)),
                "y_test": np.array([0]),
            },
            "y_train has shape",
        ),
        (
            {
                "x_train": np.zeros((3, 2)),
                "y_train": np.array([0, 1, 1]),
                "x_test": np.zeros((1, 3)),
                "y_test": np.array([0]),
            },
            "train samples",
        ),
        (
            {
                "x_train": np.full((3, 2), np.nan),
                "y_train": np.array([0, 1, 1]),
                "x_test": np.zeros((1, 2)),
                "y_test": np.array([0]),
            },
            "NaN",
        ),
    ],
)
def test_npz_malformed(tmp_path, arrays, match):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    with pytest.raises(DataError, match=match):
        load_dataset(DataConfig(name="npz", dir=str(p)), 0)


def test_cifar_needs_a_folder(tmp_path):
    with pytest.raises(DataError, match="data.dir"):
        load_dataset(DataConfig(name="cifar10"), 0)
    with pytest.raises(DataError, match="data_batch_1"):
        load_dataset(DataConfig(name="cifar10", dir=str(tmp_path)), 0)


def test_cifar_pickles(tmp_path):
    import pickle

    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(base / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 9]}, f)
    d = load_dataset(DataConfig(name="cifar10", dir=str(tmp_path)), 0)
    assert d.input_shape == (3, 32, 32) and len(d.x_train) == 20 and d.num_classes == 10


def test_digits_read_from_the_csv_equal_scikit_learn() -> None:
    from sklearn.datasets import load_digits as sk_digits

    from sparsefl.data.datasets import _digits_arrays

    x, y = _digits_arrays()
    d = sk_digits()
    assert np.array_equal(x, d.images.astype(np.float32) / 16.0) and x.dtype == np.float32
    assert np.array_equal(y, d.target) and y.dtype == np.int64


def test_class_labels_equal_np_unique_without_importing_numpy_ma():
    import subprocess
    import sys

    import numpy as np

    from sparsefl.data.datasets import class_labels

    for a in (np.array([3, 1, 2, 3, 1]), np.array([], np.int64), np.array([5]), np.arange(-3, 9).repeat(3)[::-1]):
        assert np.array_equal(class_labels(a), np.unique(a))
    # a default run's data never imports numpy.ma (np.unique does, 65 ms)
    code = (
        "import sys; from sparsefl.config import load_config; from sparsefl.experiment.runner import build; "
        "build(load_config(None, [])); print('numpy.ma' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def _npz(path, x_train, y_train, x_test=None, y_test=None, **extra):
    x_test = x_train[:4] if x_test is None else x_test
    y_test = y_train[:4] if y_test is None else y_test
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, **extra)
    return DataConfig(name="npz", dir=str(path))


@pytest.mark.parametrize(
    "y_train, y_test, num_classes, match",
    [
        ([0, 1, 2, 30_000_000], [0, 1], 0, "at most 100,000"),  # never allocates 30M classes
        ([0, 1, 2, 3], [0, 4], 0, "y_test holds label 4, beyond the training labels 0..3"),
        ([0.0, 1.0, 2.0, 3.0], [0.0, 1e30], 0, "y_test holds label 1e\\+30"),  # checked before a wrapping cast
        ([0, 1, 3, 3], [0, 1], 0, "no sample of class 2"),
        ([0, 1, 2, 10], [0, 1], 10, r"labels must lie in 0..9 \(10 classes\); found 0..10"),
        ([0, 1, 2, 1e300], [0, 1], 0, "at most 100,000"),
        ([0, 1, 2, 0.5], [0, 1], 0, "y_train holds non-integer values"),
    ],
)
def test_npz_labels_are_0_to_c_minus_1(tmp_path, y_train, y_test, num_classes, match):
    cfg = _npz(tmp_path / "l.npz", np.zeros((4, 3)), np.array(y_train), np.zeros((2, 3)), np.array(y_test))
    with pytest.raises(DataError, match=match) as e:
        load_dataset(DataConfig(name="npz", dir=cfg.dir, num_classes=num_classes), 0)
    assert str(tmp_path / "l.npz") in str(e.value) and "\n" not in str(e.value)


def test_declared_num_classes(tmp_path):
    cfg = _npz(tmp_path / "d.npz", np.zeros((4, 3)), np.array([0, 1, 1, 3]))
    assert load_dataset(DataConfig(name="npz", dir=cfg.dir, num_classes=12), 0).num_classes == 12
    with pytest.raises(ConfigError, match="0 .inferred. or 10 for digits"):
        load_dataset(DataConfig(num_classes=5), 0)


@pytest.mark.parametrize(
    "x, options, match",
    [
        (np.zeros((4, 40, 40)), {"max_pixels": 1000}, "40 x 40 = 1,600 values; data.max_pixels allows 1,000"),
        (np.full((4, 3), 1e300), {}, "x_train holds NaN, Inf or values beyond float32"),
        (np.full((4, 3), 3e38), {}, "too large to normalise"),
        (np.zeros((4, 3), dtype=np.complex128), {}, "x_train has dtype complex128; expected real numbers"),
    ],
)
def test_npz_inputs_too_large_or_not_real(tmp_path, x, options, match):
    cfg = _npz(tmp_path / "x.npz", x, np.array([0, 1, 0, 1]))
    with pytest.raises(DataError, match=match) as e:
        load_dataset(DataConfig(name="npz", dir=cfg.dir, **options), 0)
    assert str(tmp_path / "x.npz") in str(e.value)


def test_the_default_max_pixels_refuses_2000_by_2000_images(tmp_path):
    cfg = _npz(tmp_path / "big.npz", np.zeros((2, 2000, 2000), dtype=np.uint8), np.array([0, 1]))
    with pytest.raises(DataError, match="4,000,000 values; data.max_pixels allows 1,048,576"):
        load_dataset(cfg, 0)


@pytest.mark.parametrize("shape", [(30, 3, 4, 4), (30, 5, 5), (30, 7)])
def test_the_recorded_normalisation_reproduces_the_inputs_bit_for_bit(tmp_path, shape):
    rng = np.random.default_rng(0)
    raw = rng.random(shape) * 255
    cfg = _npz(tmp_path / "n.npz", raw, np.arange(30) % 3, raw[:6], np.arange(6) % 3)
    d = load_dataset(cfg, 0)
    assert d.mean.dtype == d.std.dtype == torch.float32
    assert (
        d.mean.shape == d.std.shape == ((shape[1], 1, 1) if len(shape) == 4 else (1, 1, 1) if len(shape) == 3 else (7,))
    )
    sample = torch.from_numpy(raw.astype(np.float32)).reshape(d.x_train.shape)
    assert torch.equal((sample - d.mean) / d.std, d.x_train)
    digits = load_dataset(DataConfig(), 0)
    assert digits.mean.shape == (1, 1, 1) and float(digits.std) > 0
    hand = Dataset("hand", d.x_train, d.y_train, d.x_test, d.y_test, 3)
    assert hand.mean is None and hand.std is None and hand.client_train is None


def test_a_partitioner_may_take_the_whole_dataset():
    seen = {}

    @PARTITIONERS.register("test_by_feature")
    def by_feature(labels, num_clients, cfg, rng, *, dataset):
        seen["dataset"] = dataset
        order = np.argsort(dataset.x_train[:, 0, 0, 0].numpy(), kind="stable")
        return np.array_split(order, num_clients)

    try:
        cfg = DataConfig(partition="test_by_feature")
        data = load_dataset(cfg, 0)
        split = make_partition(data, 4, cfg, 0)
        assert seen["dataset"] is data and sum(split.sizes()) == len(data.y_train)
        # given labels only, it is handed the dataset those labels came from
        again = make_partition(data.y_train.numpy(), 4, cfg, 0)
        assert seen["dataset"] is not data and all(np.array_equal(a, b) for a, b in zip(split.train, again.train))
        with pytest.raises(DataError, match="pass the Dataset to make_partition"):
            make_partition(np.zeros(len(data.y_train), dtype=int), 4, cfg, 0)
    finally:
        del PARTITIONERS._entries["test_by_feature"]


def test_client_ids_beyond_int64_are_refused_not_wrapped(tmp_path):
    ids = (np.arange(60) % 4).astype(np.float64)
    ids[7] = 1e19  # would wrap to a negative int64
    cfg = _npz(tmp_path / "ids.npz", np.zeros((60, 5), np.float32), np.arange(60) % 3, client_train=ids)
    with pytest.raises(DataError, match="client_train holds 0.0..1e\\+19; client ids are 0..K-1"):
        load_dataset(cfg, 0)
