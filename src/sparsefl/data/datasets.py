"""Offline datasets: digits, Fashion-MNIST (IDX), CIFAR-10/100 (python pickles), user .npz, synthetic.

Every loader returns a :class:`Dataset` of float32 inputs normalised with the training split's
per-channel mean and standard deviation, and int64 labels in ``0..num_classes-1``. Nothing is
downloaded: a missing or malformed dataset raises :class:`~sparsefl.errors.DataError` saying
what was expected and where it looked.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sparsefl.config import DataConfig
from sparsefl.data.partition import class_labels
from sparsefl.errors import DataError
from sparsefl.registry import DATASETS
from sparsefl.rng import np_rng

FASHION_MNIST_DIRS = (Path("/usr/share/datasets/fashion-mnist"),)


@dataclass(frozen=True)
class Dataset:
    """A train/test pair of tensors. Images are ``N x C x H x W``; flat features ``N x D``."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample (without the batch dimension)."""
        return tuple(self.x_train.shape[1:])


def load_dataset(cfg: DataConfig, seed: int) -> Dataset:
    """Load the dataset ``cfg.name`` (see ``sparsefl list``)."""
    loader = DATASETS.get(cfg.name)
    return loader(cfg, seed)


# -- helpers ----------------------------------------------------------------------------------------


def _finish(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int | None = None,
) -> Dataset:
    """Validate shapes and labels, normalise per channel, convert to tensors."""
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if x.ndim not in (2, 3, 4):
            raise DataError(f"{name}: x_{split} has shape {x.shape}; expected N x D, N x H x W or N x C x H x W")
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(f"{name}: y_{split} has shape {y.shape}; expected ({len(x)},)")
        if len(x) == 0:
            raise DataError(f"{name}: the {split} split is empty")
        if not np.issubdtype(y.dtype, np.integer):
            if not np.all(np.equal(np.mod(y, 1), 0)):
                raise DataError(f"{name}: y_{split} holds non-integer labels")
        if not np.all(np.isfinite(x)):
            raise DataError(f"{name}: x_{split} contains NaN or Inf")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"{name}: train samples are {x_train.shape[1:]}, test samples {x_test.shape[1:]}")
    y_train = y_train.astype(np.int64)
    y_test = y_test.astype(np.int64)
    lo = min(y_train.min(), y_test.min())
    k = int(max(y_train.max(), y_test.max())) + 1 if num_classes is None else num_classes
    if lo < 0 or max(y_train.max(), y_test.max()) >= k:
        raise DataError(f"{name}: labels must lie in 0..{k - 1}; found {lo}..{max(y_train.max(), y_test.max())}")
    if x_train.ndim == 3:  # N x H x W -> N x 1 x H x W
        x_train, x_test = x_train[:, None], x_test[:, None]
    x_train = x_train.astype(np.float32)
    x_test = x_test.astype(np.float32)
    axes = (0, 2, 3) if x_train.ndim == 4 else (0,)
    mean = x_train.mean(axis=axes, keepdims=True)
    std = x_train.std(axis=axes, keepdims=True)
    std[std < 1e-8] = 1.0
    x_train = (x_train - mean) / std
    x_test = (x_test - mean) / std
    return Dataset(
        name,
        torch.from_numpy(np.ascontiguousarray(x_train)),
        torch.from_numpy(y_train),
        torch.from_numpy(np.ascontiguousarray(x_test)),
        torch.from_numpy(y_test),
        k,
    )


def _holdout(x: np.ndarray, y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """Stratified, seeded train/test split for datasets that ship without a test split."""
    rng = np_rng(seed, "holdout")
    test = []
    for c in class_labels(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        test.append(idx[: max(1, int(round(fraction * len(idx))))])
    test_idx = np.sort(np.concatenate(test))
    train = np.ones(len(y), bool)
    train[test_idx] = False
    train_idx = np.flatnonzero(train)
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


# -- datasets ---------------------------------------------------------------------------------------


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The digits images (scaled to [0, 1]) and labels.

    Read straight from the CSV that scikit-learn ships (``load_digits`` reads the same file), so
    the data costs milliseconds instead of the 1-3 s of importing scikit-learn; if the file is
    not where this scikit-learn keeps it, ``sklearn.datasets.load_digits`` is used.
    """
    spec = importlib.util.find_spec("sklearn")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            data = np.loadtxt(path, delimiter=",")
            return (data[:, :-1].reshape(-1, 8, 8) / 16.0).astype(np.float32), data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


@DATASETS.register("digits")
def load_digits(cfg: DataConfig, seed: int) -> Dataset:
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes); stratified held-out test split."""
    x, y = _digits_arrays()
    return _finish("digits", *_holdout(x, y, cfg.test_fraction, seed), num_classes=10)


@DATASETS.register("synthetic")
def load_synthetic(cfg: DataConfig, seed: int) -> Dataset:
    """Seeded 1x8x8 Gaussian-blob images, 10 classes, 1,200 samples: for fast tests."""
    rng = np_rng(seed, "synthetic")
    n, k = 1200, 10
    centers = rng.normal(0, 1, size=(k, 1, 8, 8)).astype(np.float32)
    y = np.arange(n) % k
    x = centers[y] + rng.normal(0, 0.8, size=(n, 1, 8, 8)).astype(np.float32)
    return _finish("synthetic", *_holdout(x, y, cfg.test_fraction, seed), num_classes=k)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(">" + "I" * ndim, raw[4:header])
    if len(raw) - header != int(np.prod(dims)):
        raise DataError(f"{path}: IDX body has {len(raw) - header} bytes, header says {int(np.prod(dims))}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find(dirs: list[Path], stem: str) -> Path | None:
    for d in dirs:
        for name in (stem, stem + ".gz"):
            if (d / name).is_file():
                return d / name
    return None


@DATASETS.register("fashion-mnist")
def load_fashion_mnist(cfg: DataConfig, seed: int) -> Dataset:
    """Fashion-MNIST from its IDX files (Debian's dataset-fashion-mnist, or data.dir); 28x28, 10 classes."""
    dirs = [Path(cfg.dir)] if cfg.dir else list(FASHION_MNIST_DIRS)
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    paths = [_find(dirs, s) for s in stems]
    if any(p is None for p in paths):
        missing = [s for s, p in zip(stems, paths) if p is None]
        raise DataError(
            "fashion-mnist: missing "
            + ", ".join(missing)
            + " (optionally .gz) in "
            + ", ".join(str(d) for d in dirs)
            + "; install Debian's dataset-fashion-mnist package or set data.dir"
        )
    xtr, ytr, xte, yte = (_read_idx(p) for p in paths)  # type: ignore[arg-type]
    return _finish("fashion-mnist", xtr / 255.0, ytr, xte / 255.0, yte, num_classes=10)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a data problem
        raise DataError(f"cannot read CIFAR batch {path}: {e}") from None
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a pickled dict with b'data' and b'labels'")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _cifar(cfg: DataConfig, name: str, folder: str, train_files: list[str], test_file: str, label_key: str) -> Dataset:
    if not cfg.dir:
        raise DataError(f"{name}: set data.dir to the folder holding {folder}/ (the python-pickle batches)")
    root = Path(cfg.dir)
    base = root / folder if (root / folder).is_dir() else root
    missing = [f for f in [*train_files, test_file] if not (base / f).is_file()]
    if missing:
        raise DataError(f"{name}: missing {', '.join(missing)} in {base}")

    def read(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for f in files:
            d = _unpickle(base / f)
            if "data" not in d or label_key not in d:
                raise DataError(f"{base / f}: expected keys 'data' and '{label_key}'")
            x = np.asarray(d["data"], dtype=np.uint8)
            if x.ndim != 2 or x.shape[1] != 3072:
                raise DataError(f"{base / f}: data has shape {x.shape}; expected N x 3072")
            xs.append(x.reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[label_key], dtype=np.int64))
        return np.concatenate(xs) / 255.0, np.concatenate(ys)

    xtr, ytr = read(train_files)
    xte, yte = read([test_file])
    return _finish(name, xtr, ytr, xte, yte, num_classes=100 if name == "cifar100" else 10)


@DATASETS.register("cifar10")
def load_cifar10(cfg: DataConfig, seed: int) -> Dataset:
    """CIFAR-10 from the standard python-pickle batches in data.dir (cifar-10-batches-py/)."""
    return _cifar(
        cfg, "cifar10", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "labels"
    )


@DATASETS.register("cifar100")
def load_cifar100(cfg: DataConfig, seed: int) -> Dataset:
    """CIFAR-100 (fine labels) from the standard python-pickle files in data.dir (cifar-100-python/)."""
    return _cifar(cfg, "cifar100", "cifar-100-python", ["train"], "test", "fine_labels")


@DATASETS.register("npz")
def load_npz(cfg: DataConfig, seed: int) -> Dataset:
    """A user .npz (data.dir = the file) with x_train, y_train, x_test, y_test; images or flat features."""
    if not cfg.dir:
        raise DataError("npz: set data.dir to the .npz file holding x_train, y_train, x_test, y_test")
    path = Path(cfg.dir)
    if path.is_dir():
        found = sorted(path.glob("*.npz"))
        if len(found) != 1:
            raise DataError(f"npz: {path} holds {len(found)} .npz files; point data.dir at one file")
        path = found[0]
    if not path.is_file():
        raise DataError(f"npz: no file at {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - zip/npy errors are data problems
        raise DataError(f"npz: cannot read {path}: {e}") from None
    need = ("x_train", "y_train", "x_test", "y_test")
    missing = [k for k in need if k not in arrays]
    if missing:
        raise DataError(f"npz: {path} lacks {', '.join(missing)} (has {', '.join(arrays) or 'nothing'})")
    x_train, y_train, x_test, y_test = (arrays[k] for k in need)
    for k in need:
        if not (np.issubdtype(arrays[k].dtype, np.number) or arrays[k].dtype == bool):
            raise DataError(f"npz: {k} has dtype {arrays[k].dtype}; expected numbers")
    return _finish("npz", x_train.astype(np.float64), y_train, x_test.astype(np.float64), y_test)
