"""Partitioners: split the training set among clients, seeded and reproducible.

Each partitioner maps ``(labels, num_clients, cfg, rng)`` to one index array per client; one
that declares a ``dataset`` keyword parameter is also given the whole training set (the
:class:`~sparsefl.data.datasets.Dataset`). A per-client validation split
(``data.val_fraction``) is then cut off each client's indices.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np

from sparsefl.config import DataConfig
from sparsefl.data.datasets import Dataset, class_labels, load_dataset
from sparsefl.errors import DataError
from sparsefl.registry import PARTITIONERS
from sparsefl.rng import np_rng


@dataclass(frozen=True)
class ClientSplit:
    """Training (and optional validation) sample indices of every client."""

    train: tuple[np.ndarray, ...]
    val: tuple[np.ndarray, ...]

    def sizes(self) -> list[int]:
        """Training samples per client."""
        return [len(t) for t in self.train]

    def label_histogram(self, labels: np.ndarray, num_classes: int) -> np.ndarray:
        """``num_clients x num_classes`` counts of training labels."""
        return np.stack([np.bincount(labels[t], minlength=num_classes) for t in self.train])


def make_partition(data: Dataset | np.ndarray, num_clients: int, cfg: DataConfig, seed: int) -> ClientSplit:
    """Split the training set among ``num_clients`` with ``cfg.partition``.

    Parameters
    ----------
    data:
        The :class:`Dataset`, or only its training labels. Given labels only, a partitioner that
        takes the dataset gets it from ``load_dataset(cfg, seed)``, checked against the labels.
    num_clients, cfg, seed:
        ``federation.num_clients``, the ``data`` section and the run seed (``data.partition_seed``
        overrides it).
    """
    dataset = data if isinstance(data, Dataset) else None
    labels = dataset.y_train.numpy() if dataset is not None else np.asarray(data)
    if num_clients > len(labels):
        raise DataError(
            f"cannot give {num_clients} clients at least one sample each: the training set has {len(labels)}"
        )
    partitioner = PARTITIONERS.get(cfg.partition)
    extra = {}
    if "dataset" in inspect.signature(partitioner).parameters:
        if dataset is None:
            dataset = load_dataset(cfg, seed)
            if not np.array_equal(dataset.y_train.numpy(), labels):
                raise DataError(
                    f"data.partition={cfg.partition!r} needs the training set: pass the Dataset to make_partition"
                )
        extra["dataset"] = dataset
    pseed = seed if cfg.partition_seed is None else cfg.partition_seed
    rng = np_rng(pseed, "partition", cfg.partition)
    parts = partitioner(labels, num_clients, cfg, rng, **extra)
    train, val = [], []
    vrng = np_rng(pseed, "val-split")
    for p in parts:
        p = np.sort(np.asarray(p, dtype=np.int64))
        n_val = int(round(cfg.val_fraction * len(p)))
        if n_val and len(p) - n_val < 1:
            raise DataError("data.val_fraction leaves a client with no training samples")
        perm = vrng.permutation(p)
        val.append(np.sort(perm[:n_val]))
        train.append(np.sort(perm[n_val:]))
    return ClientSplit(tuple(train), tuple(val))


@PARTITIONERS.register("iid")
def iid(labels: np.ndarray, num_clients: int, cfg: DataConfig, rng: np.random.Generator) -> list[np.ndarray]:
    """Uniformly random, equal-sized (within one) shares."""
    return list(np.array_split(rng.permutation(len(labels)), num_clients))


@PARTITIONERS.register("dirichlet")
def dirichlet(labels: np.ndarray, num_clients: int, cfg: DataConfig, rng: np.random.Generator) -> list[np.ndarray]:
    """Latent Dirichlet allocation (Hsu et al. 2019): each class is split among clients with
    proportions drawn from Dir(alpha); redrawn until every client has ``data.min_samples``."""
    classes = class_labels(labels)
    need = cfg.min_samples
    if need * num_clients > len(labels):
        raise DataError(
            f"data.min_samples={need} x federation.num_clients={num_clients} exceeds the "
            f"{len(labels)} training samples; lower data.min_samples or the number of clients"
        )
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    for _ in range(1000):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for idx in by_class:
            p = rng.dirichlet(np.full(num_clients, cfg.alpha))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].append(chunk)
        out = [np.concatenate(p) for p in parts]
        if min(len(o) for o in out) >= need:
            return out
    raise DataError(
        f"dirichlet partition: no draw in 1000 gave every client {need} samples "
        f"(alpha={cfg.alpha}, {num_clients} clients, {len(labels)} samples); "
        "raise data.alpha or lower data.min_samples"
    )


@PARTITIONERS.register("shards")
def shards(labels: np.ndarray, num_clients: int, cfg: DataConfig, rng: np.random.Generator) -> list[np.ndarray]:
    """McMahan et al.: sort by label, cut into ``num_clients * shards_per_client`` shards, deal them out."""
    n_shards = num_clients * cfg.shards_per_client
    if n_shards > len(labels):
        raise DataError(
            f"shards partition: {n_shards} shards (num_clients x data.shards_per_client) "
            f"exceed the {len(labels)} training samples"
        )
    order = rng.permutation(len(labels))
    order = order[np.argsort(labels[order], kind="stable")]
    pieces = np.array_split(order, n_shards)
    deal = rng.permutation(n_shards)
    return [
        np.concatenate([pieces[s] for s in deal[k * cfg.shards_per_client : (k + 1) * cfg.shards_per_client]])
        for k in range(num_clients)
    ]


@PARTITIONERS.register("natural")
def natural(
    labels: np.ndarray, num_clients: int, cfg: DataConfig, rng: np.random.Generator, *, dataset: Dataset
) -> list[np.ndarray]:
    """The dataset's own split: client k holds the samples whose client id is k (npz client_train, LEAF users)."""
    if dataset.client_train is None:
        raise DataError(
            f"data.partition='natural' needs per-sample client ids, which {dataset.name} lacks: "
            "use data.name='npz' with a client_train array, or data.name='leaf'"
        )
    ids = dataset.client_train.numpy()
    found = int(ids.max()) + 1
    if found != num_clients:
        raise DataError(
            f"data.partition='natural': {dataset.name} has client ids 0..{found - 1}, {found} clients; "
            f"set federation.num_clients={found} (it is {num_clients})"
        )
    counts = np.bincount(ids, minlength=num_clients)
    if (counts == 0).any():
        raise DataError(
            f"data.partition='natural': client {int(np.argmin(counts))} of {dataset.name} has no training "
            "samples; client ids must be 0..K-1, each with samples"
        )
    order = np.argsort(ids, kind="stable")
    return np.split(order, np.cumsum(counts)[:-1])
