"""The one sparsity vocabulary: :class:`Mask`, a mapping from state_dict names to boolean tensors.

``True`` means *kept*. A mask never renames or wraps the user's parameters: its keys are exactly
the names ``model.state_dict()`` uses, so it can be saved beside a checkpoint, sent over the
wire, and applied to any copy of the model. Tensors a mask does not name are dense.

Words: *density* is the fraction of the masked coordinates that are kept; *sparsity* is
``1 - density``. Both are fractions of the coordinates the mask covers (not of all parameters).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

Tensor = torch.Tensor

#: Module types whose ``weight`` is prunable by default.
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def default_scope(model: nn.Module, *, keep_first: bool = False, keep_last: bool = False) -> list[str]:
    """State_dict names of the prunable tensors: the weights of every Conv and Linear layer.

    Parameters
    ----------
    keep_first, keep_last:
        Leave the first (input) or last (classifier) such layer out of the scope, so it stays dense.
        "First" and "last" follow module registration order, which for every model here is the
        order of the forward pass.
    """
    names = [
        f"{mod_name}.weight" if mod_name else "weight"
        for mod_name, mod in model.named_modules()
        if isinstance(mod, PRUNABLE_TYPES) and getattr(mod, "weight", None) is not None
    ]
    if keep_first and names:
        names = names[1:]
    if keep_last and names:
        names = names[:-1]
    return names


class Mask(Mapping[str, Tensor]):
    """An immutable mapping ``state_dict name -> bool tensor`` (True = kept).

    Construct from any mapping of boolean (or 0/1) tensors. The tensors are copied to CPU, made
    contiguous and boolean; the mask is not changed afterwards (methods return new masks).
    """

    __slots__ = ("_m",)

    def __init__(self, masks: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]] = ()) -> None:
        items = masks.items() if isinstance(masks, Mapping) else masks
        m: dict[str, Tensor] = {}
        for name, t in items:
            if not isinstance(t, Tensor):
                raise TypeError(f"mask entry {name!r} is {type(t).__name__}, expected a tensor")
            if t.dtype != torch.bool:
                if t.is_floating_point() and not bool(((t == 0) | (t == 1)).all()):
                    raise ValueError(f"mask entry {name!r} has values other than 0 and 1")
                t = t != 0
            m[name] = t.detach().to("cpu").contiguous()
        self._m = m

    # -- Mapping protocol -------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Tensor:
        return self._m[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._m)

    def __len__(self) -> int:
        return len(self._m)

    def __repr__(self) -> str:
        return f"Mask({len(self)} tensors, density={self.density():.4f})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        return set(self) == set(other) and all(torch.equal(self[k], other[k]) for k in self)

    __hash__ = None  # type: ignore[assignment]

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def ones(cls, state: Mapping[str, Tensor], names: Iterable[str]) -> Mask:
        """A fully dense mask over ``names`` shaped like the tensors in ``state``."""
        return cls({n: torch.ones(state[n].shape, dtype=torch.bool) for n in names})

    @classmethod
    def for_model(cls, model: nn.Module, names: Iterable[str] | None = None) -> Mask:
        """A fully dense mask over ``names`` (default: :func:`default_scope`) of ``model``."""
        sd = model.state_dict()
        return cls.ones(sd, default_scope(model) if names is None else names)

    # -- measures ---------------------------------------------------------------------------------
    def numel(self) -> int:
        """Number of coordinates the mask covers."""
        return sum(t.numel() for t in self._m.values())

    def num_kept(self) -> int:
        """Number of kept coordinates."""
        return sum(int(t.sum()) for t in self._m.values())

    def density(self) -> float:
        """Kept coordinates / covered coordinates (1.0 for an empty mask)."""
        n = self.numel()
        return 1.0 if n == 0 else self.num_kept() / n

    def sparsity(self) -> float:
        """Removed coordinates / covered coordinates."""
        return 1.0 - self.density()

    def layer_density(self) -> dict[str, float]:
        """Per-tensor density (kept / numel of that tensor)."""
        return {n: (float(t.float().mean()) if t.numel() else 1.0) for n, t in self._m.items()}

    # -- algebra ----------------------------------------------------------------------------------
    def _combine(self, other: Mapping[str, Tensor], op) -> Mask:  # type: ignore[no-untyped-def]
        names = list(self) + [n for n in other if n not in self._m]
        out = {}
        for n in names:
            if n in self._m and n in other:
                out[n] = op(self._m[n], other[n].to(torch.bool))
            else:
                out[n] = (self._m[n] if n in self._m else other[n]).clone()
        return Mask(out)

    def union(self, other: Mapping[str, Tensor]) -> Mask:
        """Coordinate-wise OR (a name present in only one mask is taken as is)."""
        return self._combine(other, torch.logical_or)

    def intersection(self, other: Mapping[str, Tensor]) -> Mask:
        """Coordinate-wise AND (a name present in only one mask is taken as is)."""
        return self._combine(other, torch.logical_and)

    # -- use --------------------------------------------------------------------------------------
    def check(self, state: Mapping[str, Tensor]) -> None:
        """Raise ``ValueError`` unless every masked name exists in ``state`` with the same shape."""
        for n, t in self._m.items():
            if n not in state:
                raise ValueError(f"mask names {n!r}, which the model does not have")
            if tuple(state[n].shape) != tuple(t.shape):
                raise ValueError(f"mask {n!r} has shape {tuple(t.shape)}, tensor has {tuple(state[n].shape)}")

    def apply_(self, state: Mapping[str, Tensor]) -> None:
        """Zero, in place, the removed coordinates of the tensors in ``state`` (no autograd)."""
        self.check(state)
        with torch.no_grad():
            for n, m in self._m.items():
                t = state[n]
                t.mul_(m.to(device=t.device, dtype=t.dtype))

    def apply_to_model_(self, model: nn.Module) -> None:
        """Zero the removed weights of ``model`` in place."""
        self.apply_(model.state_dict(keep_vars=True))

    def applied(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """A copy of ``state`` with the removed coordinates zeroed."""
        self.check(state)
        return {n: (t * self._m[n].to(t.dtype) if n in self._m else t.clone()) for n, t in state.items()}

    def to_dict(self) -> dict[str, Tensor]:
        """A plain ``dict`` copy."""
        return {n: t.clone() for n, t in self._m.items()}

    # -- persistence ------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the mask as a safetensors file (bool tensors)."""
        from safetensors.torch import save

        from sparsefl.state import atomic_write_bytes

        atomic_write_bytes(path, save(dict(self._m)))

    @classmethod
    def load(cls, path: str | Path) -> Mask:
        """Read a mask written by :meth:`save`."""
        from safetensors.torch import load_file

        return cls(load_file(str(path)))
