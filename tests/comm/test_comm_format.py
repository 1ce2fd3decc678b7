"""No hidden bytes: a message is exactly the sum of its documented parts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sparsefl.comm import (
    Update,
    container_nbytes,
    describe,
    encode_tensor,
    encode_update,
)
from sparsefl.comm.entropy import gaps_from_indices, rice_best_k, rice_nbytes
from sparsefl.comm.format import (
    CONTAINER_FIXED_BYTES,
    TENSOR_FIXED_BYTES,
    field_spans,
    varint_len,
)
from sparsefl.config import ModelConfig
from sparsefl.models import build_model


def _update(seed: int = 0) -> tuple[Update, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 32, 3, 3, generator=g)
    m = torch.rand(w.shape, generator=g) < 0.1
    s = torch.sign(torch.randn(300, generator=g))
    sm = torch.rand(300, generator=g) < 0.5
    return (
        Update(
            {
                "conv.weight": w,
                "fc.bias": torch.randn(10, generator=g),
                "steps": torch.tensor(7),
                "signs": s,
                "ünï": torch.zeros(0, 3),
            },
            {"conv.weight": m, "signs": sm},
        ),
        {"signs": sm},
    )


@pytest.mark.parametrize("codec", ["auto", "float32", "float16", "bfloat16", "bitmask", "coo", "coo-rice", "int8"])
def test_message_length_is_the_sum_of_its_parts(codec: str) -> None:
    u, known = _update()
    data = encode_update(u, codec, known=known)
    parts = container_nbytes(len(u.values))
    for name in sorted(u.values):
        raw = name.encode("utf-8")
        parts += varint_len(len(raw)) + len(raw)
        parts += len(encode_tensor(u.values[name], u.sent.get(name), codec, known=known.get(name), name=name))
    assert len(data) == parts
    assert container_nbytes(len(u.values)) == CONTAINER_FIXED_BYTES + 1 == 10
    # describe() accounts for every byte as name, header, mask or values
    infos = describe(data)
    assert [i.name for i in infos] == sorted(u.values)
    assert sum(i.nbytes for i in infos) + container_nbytes(len(infos)) == len(data)
    spans = field_spans(data)
    assert sum(e - s for _, s, e in spans) == len(data)  # spans tile the message
    assert all(a[2] == b[1] for a, b in zip(spans, spans[1:], strict=False))


def _header_nbytes(shape: tuple[int, ...], nnz: int, mask: int, values: int) -> int:
    return (
        TENSOR_FIXED_BYTES + sum(varint_len(d) for d in shape) + varint_len(nnz) + varint_len(mask) + varint_len(values)
    )


def test_section_sizes_are_as_documented() -> None:
    """Each record = header + mask section + value section, with the documented sizes."""
    g = torch.Generator().manual_seed(1)
    shape = (200, 50)
    n = math.prod(shape)
    w = torch.randn(shape, generator=g)
    m = torch.rand(shape, generator=g) < 0.07
    nnz = int(m.sum())
    gaps = gaps_from_indices(np.flatnonzero(m.numpy().ravel()))
    k = rice_best_k(gaps)
    expect = {
        "float32": (min((n + 7) // 8, rice_nbytes(gaps, k)), 4 * n),
        "float16": (min((n + 7) // 8, rice_nbytes(gaps, k)), 2 * n),
        "bitmask": ((n + 7) // 8, 4 * nnz),
        "coo": (sum(varint_len(int(x)) for x in gaps), 4 * nnz),
        "coo-rice": ((nnz * k + 7) // 8 + (int((gaps >> k).sum()) + nnz + 7) // 8, 4 * nnz),
        "int8": (rice_nbytes(gaps, k), 4 + nnz),
        "auto": (rice_nbytes(gaps, k), 4 * nnz),
    }
    for codec, (mask, values) in expect.items():
        rec = encode_tensor(w, m, codec)
        assert len(rec) == _header_nbytes(shape, nnz, mask, values) + mask + values, codec
    # dense: no mask; known: a 4-byte fingerprint; sign: one bit per sent value
    assert len(encode_tensor(w, None, "float32")) == _header_nbytes(shape, n, 0, 4 * n) + 4 * n
    s = torch.sign(w)
    rec = encode_tensor(s, m, "sign", known=m)
    assert len(rec) == _header_nbytes(shape, nnz, 4, (nnz + 7) // 8) + 4 + (nnz + 7) // 8


def test_headers_of_a_resnet18_fit_in_64_bytes() -> None:
    """Name record + tensor header <= 64 bytes for every ResNet-18 tensor, in every mode."""
    sd = build_model(ModelConfig(name="resnet18"), (3, 32, 32), 10, 0).state_dict()
    g = torch.Generator().manual_seed(0)
    sent = {k: torch.rand(v.shape, generator=g) < 0.1 for k, v in sd.items() if v.is_floating_point()}
    u = Update(dict(sd), sent)
    for codec in ("auto", "float32", "coo", "bitmask"):
        for info in describe(encode_update(u, codec)):
            assert info.name_nbytes + info.header_nbytes <= 64, (codec, info)


def test_crc32_is_zlibs_checksum_and_zlib_ng_computes_it() -> None:
    """The wire format's CRC is zlib's CRC-32, computed by zlib-ng (a dependency) when it is
    installed: the same value on any bytes, buffers and running values."""
    import os
    import zlib

    from sparsefl.comm import format as F

    for n in (0, 1, 7, 64, 4099, 213_648):
        data = os.urandom(n)
        assert F.crc32(data) == zlib.crc32(data)
        assert F.crc32(memoryview(data)[1:], 12345) == zlib.crc32(memoryview(data)[1:], 12345)
    assert F._crc32 is not zlib.crc32  # the accelerated one is in use in this environment
