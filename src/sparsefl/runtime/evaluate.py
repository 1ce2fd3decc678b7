"""Evaluation of a state_dict on a test set."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def evaluate(
    model: nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, batch_size: int = 512
) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` loaded with ``params`` on ``(x, y)``, in eval mode.

    It computes where ``model`` and ``x`` are (on one device); ``params`` may be anywhere (they
    are copied into the model)."""
    model.load_state_dict(params, strict=True)
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(x), batch_size):
        logits = model(x[i : i + batch_size])
        yb = y[i : i + batch_size]
        loss += float(F.cross_entropy(logits.float(), yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    n = max(len(x), 1)
    return correct / n, loss / n
