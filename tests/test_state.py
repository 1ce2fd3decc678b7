from __future__ import annotations

import torch

from sparsefl.state import atomic_write_text, state_sha256


def test_sha_is_canonical_and_sensitive():
    a = {"b": torch.ones(2), "a": torch.zeros(3, dtype=torch.int64)}
    b = {"a": torch.zeros(3, dtype=torch.int64), "b": torch.ones(2)}
    assert state_sha256(a) == state_sha256(b)
    c = {"a": torch.zeros(3, dtype=torch.int64), "b": torch.tensor([1.0, 1.0000001])}
    assert state_sha256(a) != state_sha256(c)
    assert state_sha256({"b": torch.ones(2, dtype=torch.float64), "a": a["a"]}) != state_sha256(a)


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "f.json"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert [x.name for x in tmp_path.iterdir()] == ["f.json"]
