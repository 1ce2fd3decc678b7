"""Offline datasets: digits, Fashion-MNIST (IDX), CIFAR-10/100 (python pickles), user .npz, LEAF
JSON folders, synthetic.

Every loader returns a :class:`Dataset` of float32 inputs normalised with the training split's
per-channel mean and standard deviation (recorded on it), and int64 labels in
``0..num_classes-1``. The npz and LEAF loaders also give each training sample's client id, for
the ``natural`` partition. Nothing is downloaded: a missing or malformed dataset raises
:class:`~sparsefl.errors.DataError` naming the file and the array, and what was expected.

The class count of user data is ``data.num_classes``, or inferred: the training labels must be
exactly ``0..C-1``, every class present, with ``C <=`` :data:`MAX_INFERRED_CLASSES`.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sparsefl.config import DataConfig
from sparsefl.errors import ConfigError, DataError
from sparsefl.registry import DATASETS
from sparsefl.rng import np_rng

FASHION_MNIST_DIRS = (Path("/usr/share/datasets/fashion-mnist"),)

#: The most classes a class count inferred from the labels may have (``data.num_classes`` declares more).
MAX_INFERRED_CLASSES = 100_000


@dataclass(frozen=True)
class Dataset:
    """A train/test pair of tensors. Images are ``N x C x H x W``; flat features ``N x D``.

    ``mean`` and ``std`` are the per-channel statistics the inputs were normalised with, shaped
    to broadcast against one sample (``C x 1 x 1`` or ``D``): a sample is ``(raw - mean) / std``
    in float32, ``raw`` being the loader's float32 values. ``None`` means the inputs are used as
    given (a Dataset built by hand). ``client_train`` is each training sample's client id (the
    ``natural`` partition), or ``None``.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    client_train: torch.Tensor | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample (without the batch dimension)."""
        return tuple(self.x_train.shape[1:])


def load_dataset(cfg: DataConfig, seed: int) -> Dataset:
    """Load the dataset ``cfg.name`` (see ``sparsefl list``)."""
    loader = DATASETS.get(cfg.name)
    data = loader(cfg, seed)
    if cfg.num_classes and data.num_classes != cfg.num_classes:
        raise ConfigError("data.num_classes", cfg.num_classes, f"0 (inferred) or {data.num_classes} for {cfg.name}")
    return data


# -- helpers ----------------------------------------------------------------------------------------


def class_labels(labels: np.ndarray) -> np.ndarray:
    """The sorted distinct labels: ``np.unique(labels)``, which imports ``numpy.ma`` on its
    first call (65 ms, 2% of a default run)."""
    s = np.sort(labels)
    return s[np.concatenate(([True], s[1:] != s[:-1]))] if s.size else s


def _check_sample_size(source: str, shape: tuple[int, ...], max_pixels: int | None) -> None:
    """DataError when one training sample of ``shape`` (``N x ...``) holds more than ``max_pixels`` values."""
    size = int(np.prod(shape[1:]))
    if max_pixels is not None and size > max_pixels:
        raise DataError(
            f"{source}: x_train's samples are {' x '.join(map(str, shape[1:]))} = {size:,} values; "
            f"data.max_pixels allows {max_pixels:,} (raise it for larger samples)"
        )


def _check_integers(source: str, key: str, a: np.ndarray) -> None:
    """DataError unless ``a`` holds only integers (an integer dtype, or integer-valued floats)."""
    if np.issubdtype(a.dtype, np.integer) or a.dtype == bool:
        return
    if not np.all(np.isfinite(a)) or not np.all(np.equal(np.mod(a, 1), 0)):
        raise DataError(f"{source}: {key} holds non-integer values; expected integers")


def _labels(
    source: str, y_train: np.ndarray, y_test: np.ndarray, num_classes: int | None
) -> tuple[np.ndarray, np.ndarray, int]:
    """The labels as int64 and the class count: ``num_classes``, or inferred (module docstring).
    Every range is checked before the cast, so a huge label is refused, never allocated for."""
    for key, y in (("y_train", y_train), ("y_test", y_test)):
        _check_integers(source, key, y)
    lo, hi = min(y_train.min(), y_test.min()), max(y_train.max(), y_test.max())
    if num_classes is not None:
        if lo < 0 or hi >= num_classes:
            raise DataError(
                f"{source}: labels must lie in 0..{num_classes - 1} ({num_classes} classes); found {lo}..{hi}"
            )
        return y_train.astype(np.int64), y_test.astype(np.int64), num_classes
    if lo < 0:
        raise DataError(f"{source}: labels must lie in 0..C-1; found {lo}")
    top = y_train.max()
    if top >= MAX_INFERRED_CLASSES:
        raise DataError(
            f"{source}: y_train's largest label is {top}: an inferred class count is at most "
            f"{MAX_INFERRED_CLASSES:,} (labels 0..C-1); set data.num_classes to declare more"
        )
    k = int(top) + 1
    if y_test.max() >= k:  # before the cast: a huge float label would wrap
        raise DataError(
            f"{source}: y_test holds label {y_test.max()}, beyond the training labels 0..{k - 1}; "
            "set data.num_classes if it is a class"
        )
    y_train, y_test = y_train.astype(np.int64), y_test.astype(np.int64)
    absent = np.flatnonzero(np.bincount(y_train, minlength=k) == 0)
    if absent.size:
        raise DataError(
            f"{source}: y_train has no sample of class {absent[0]} (labels run to {k - 1}): inferred classes "
            "are 0..C-1, each in the training set; set data.num_classes if some need not be"
        )
    return y_train, y_test, k


def _finish(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int | None = None,
    *,
    source: str | None = None,
    max_pixels: int | None = None,
    client_train: np.ndarray | None = None,
) -> Dataset:
    """Validate shapes, values and labels, normalise per channel, convert to tensors.

    Parameters
    ----------
    num_classes:
        The class count; ``None`` infers it (module docstring).
    source:
        What the messages name (the file); default ``name``.
    max_pixels:
        The most values one sample may hold (``data.max_pixels``); ``None``: no limit.
    client_train:
        Each training sample's client id (integers >= 0), or ``None``.
    """
    src = source or name
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if x.ndim not in (2, 3, 4):
            raise DataError(f"{src}: x_{split} has shape {x.shape}; expected N x D, N x H x W or N x C x H x W")
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(f"{src}: y_{split} has shape {y.shape}; expected ({len(x)},)")
        if len(x) == 0:
            raise DataError(f"{src}: the {split} split is empty")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"{src}: train samples are {x_train.shape[1:]}, test samples {x_test.shape[1:]}")
    _check_sample_size(src, x_train.shape, max_pixels)
    y_train, y_test, k = _labels(src, y_train, y_test, num_classes)
    ids = None
    if client_train is not None:
        if client_train.shape != y_train.shape:
            raise DataError(f"{src}: client_train has shape {client_train.shape}; expected ({len(y_train)},)")
        _check_integers(src, "client_train", client_train)
        if client_train.min() < 0 or client_train.max() >= len(y_train):
            raise DataError(
                f"{src}: client_train holds {client_train.min()}..{client_train.max()}; client ids are 0..K-1 "
                f"with K at most the {len(y_train)} training samples"
            )
        ids = torch.from_numpy(client_train.astype(np.int64))
    if x_train.ndim == 3:  # N x H x W -> N x 1 x H x W
        x_train, x_test = x_train[:, None], x_test[:, None]
    axes = (0, 2, 3) if x_train.ndim == 4 else (0,)
    with np.errstate(over="ignore"):  # an overflow is reported below, as one DataError
        x_train = x_train.astype(np.float32)
        x_test = x_test.astype(np.float32)
        for split, x in (("train", x_train), ("test", x_test)):
            if not np.all(np.isfinite(x)):  # after the cast: float64 values beyond float32 became inf
                raise DataError(f"{src}: x_{split} holds NaN, Inf or values beyond float32's range (3.4e38)")
        mean = x_train.mean(axis=axes, keepdims=True)
        std = x_train.std(axis=axes, keepdims=True)
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std))):
        raise DataError(f"{src}: x_train's values are too large to normalise in float32 (the mean or std overflows)")
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
        mean=torch.from_numpy(mean[0].copy()),
        std=torch.from_numpy(std[0].copy()),
        client_train=ids,
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
    """A user .npz (data.dir = the file) with x_train, y_train, x_test, y_test (and client_train for
    the natural partition); images or flat features."""
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
    if "client_test" in arrays:
        raise DataError(
            f"npz: {path}: client_test is not supported (x_test, y_test is one test set shared by all "
            "clients); remove it (client_train gives the natural split)"
        )
    for k in (*need, "client_train"):
        if k in arrays and arrays[k].dtype.kind not in "biuf":  # complex would be cut to its real part
            raise DataError(f"npz: {path}: {k} has dtype {arrays[k].dtype}; expected real numbers (bool, int, float)")
    x_train, y_train, x_test, y_test = (arrays[k] for k in need)
    _check_sample_size(f"npz {path}", x_train.shape, cfg.max_pixels)  # before any copy of a huge array
    return _finish(
        "npz",
        x_train.astype(np.float64),
        y_train,
        x_test.astype(np.float64),
        y_test,
        cfg.num_classes or None,
        source=f"npz {path}",
        max_pixels=cfg.max_pixels,
        client_train=arrays.get("client_train"),
    )


def _read_leaf(folder: Path) -> dict[str, tuple[list, list, Path]]:
    """user -> (x, y, file) from every ``*.json`` in ``folder`` (LEAF: users, num_samples, user_data)."""
    files = sorted(folder.glob("*.json"))
    if not files:
        raise DataError(f"leaf: no .json files in {folder}; data.dir must hold train/*.json and test/*.json")
    out: dict[str, tuple[list, list, Path]] = {}
    for f in files:
        try:
            d = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"leaf: cannot read {f}: {e}") from None
        if not isinstance(d, dict) or not all(k in d for k in ("users", "num_samples", "user_data")):
            raise DataError(f"leaf: {f} lacks users, num_samples or user_data (the LEAF JSON format)")
        users, counts, data = d["users"], d["num_samples"], d["user_data"]
        if not (isinstance(users, list) and isinstance(counts, list) and isinstance(data, dict)):
            raise DataError(f"leaf: {f}: users and num_samples must be lists and user_data a table")
        if len(users) != len(counts):
            raise DataError(f"leaf: {f}: {len(users)} users but {len(counts)} num_samples")
        for u, n in zip(users, counts):
            entry = data.get(u) if isinstance(u, str) else None
            if not (isinstance(entry, dict) and isinstance(entry.get("x"), list) and isinstance(entry.get("y"), list)):
                raise DataError(f"leaf: {f}: user_data has no x and y lists for user {u!r}")
            if not len(entry["x"]) == len(entry["y"]) == n:
                raise DataError(
                    f"leaf: {f}: user {u!r} has {len(entry['x'])} x and {len(entry['y'])} y; num_samples says {n}"
                )
            if u in out:
                raise DataError(f"leaf: user {u!r} is in both {out[u][2]} and {f}")
            out[u] = (entry["x"], entry["y"], f)
    return out


def _leaf_arrays(folder: Path, users: dict[str, tuple[list, list, Path]]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The samples of every user in sorted order as arrays, and each user's count."""
    names = sorted(users)
    try:
        x = np.asarray([s for u in names for s in users[u][0]], dtype=np.float64)
    except (TypeError, ValueError, OverflowError) as e:
        raise DataError(f"leaf: {folder}: x must hold numbers, one shape per sample ({e})") from None
    try:
        y = np.asarray([s for u in names for s in users[u][1]])
    except (TypeError, ValueError, OverflowError) as e:
        raise DataError(f"leaf: {folder}: y must hold one integer label per sample ({e})") from None
    if y.dtype.kind not in "biuf":
        raise DataError(f"leaf: {folder}: y must hold integer labels (found {y.dtype})")
    return x, y, [len(users[u][1]) for u in names]


@DATASETS.register("leaf")
def load_leaf(cfg: DataConfig, seed: int) -> Dataset:
    """LEAF-format JSON (data.dir holds train/*.json, test/*.json); client i = the i-th user, sorted."""
    if not cfg.dir:
        raise DataError("leaf: set data.dir to the folder holding train/*.json and test/*.json")
    root = Path(cfg.dir)
    x_train, y_train, counts = _leaf_arrays(root / "train", _read_leaf(root / "train"))
    x_test, y_test, _ = _leaf_arrays(root / "test", _read_leaf(root / "test"))
    return _finish(
        "leaf",
        x_train,
        y_train,
        x_test,
        y_test,
        cfg.num_classes or None,
        source=f"leaf {root}",
        max_pixels=cfg.max_pixels,
        client_train=np.repeat(np.arange(len(counts)), counts),
    )
