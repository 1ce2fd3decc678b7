"""The input transform of a run: the per-channel normalisation its dataset loader applied.

The built-in loaders normalise inputs with the training split's per-channel mean and standard
deviation. A run records both in ``model.json``, so that its model can be used on raw inputs:
:class:`InputTransform` computes ``(x - mean) / std`` in float32 exactly as the loader did, so
raw inputs become the very tensors the run was evaluated on, bit for bit.

A :class:`~sparsefl.data.Dataset` carries the ``mean`` and ``std`` its loader used; a dataset
without them (a user loader returning ready tensors) is used as given: its transform is the
identity.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sparsefl.data import Dataset


class InputTransform(nn.Module):
    """Raw inputs -> the model's inputs: float32, then ``(x - mean) / std`` when the run's data
    was normalised. Images stored without a channel axis (``N x H x W``, as IDX files and many
    .npz files hold them) get one, as the loaders add it.

    Parameters
    ----------
    input_shape:
        One sample's shape as the model takes it (``C x H x W`` or ``D``).
    mean, std:
        Broadcastable float32 statistics, or both None (no normalisation).
    """

    def __init__(
        self, input_shape: tuple[int, ...], mean: torch.Tensor | None = None, std: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.mean: torch.Tensor | None
        self.std: torch.Tensor | None
        self.register_buffer("mean", None if mean is None else mean.to(torch.float32))
        self.register_buffer("std", None if std is None else std.to(torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.input_shape) == 3 and self.input_shape[0] == 1 and x.dim() == 3:
            x = x.unsqueeze(1)
        x = x.to(torch.float32)
        if self.mean is None or self.std is None:
            return x
        return (x - self.mean) / self.std

    @classmethod
    def of_data(cls, data: Dataset) -> InputTransform:
        """The transform of a loaded dataset: its ``mean``/``std``, or the identity."""
        if data.mean is None or data.std is None:
            return cls(data.input_shape)
        return cls(data.input_shape, data.mean, data.std)

    def to_json(self) -> dict[str, Any] | None:
        """``model.json``'s ``input_transform``: the statistics' shape and values (None: identity)."""
        if self.mean is None or self.std is None:
            return None
        return {
            "shape": list(self.mean.shape),
            "mean": self.mean.reshape(-1).tolist(),
            "std": self.std.reshape(-1).tolist(),
        }

    @classmethod
    def from_json(cls, input_shape: tuple[int, ...], record: dict[str, Any] | None) -> InputTransform:
        """Inverse of :meth:`to_json` (float32 values survive JSON exactly)."""
        if record is None:
            return cls(input_shape)
        shape = tuple(record["shape"])
        mean = torch.tensor(record["mean"], dtype=torch.float32).reshape(shape)
        std = torch.tensor(record["std"], dtype=torch.float32).reshape(shape)
        return cls(input_shape, mean, std)
