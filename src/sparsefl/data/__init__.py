"""Datasets (all offline) and partitioners."""

from sparsefl.data import datasets, partition  # noqa: F401  (fill the registries)
from sparsefl.data.datasets import Dataset, load_dataset
from sparsefl.data.partition import ClientSplit, make_partition

__all__ = ["Dataset", "ClientSplit", "load_dataset", "make_partition"]
