"""Aggregation rules against hand-computed oracles."""

from __future__ import annotations

import torch

from sparsefl.comm import Update
from sparsefl.protocol import aggregate as agg
from sparsefl.protocol.sampling import round_lr, sample_clients


def _u(vals, sent=None):
    v = {"w": torch.tensor(vals, dtype=torch.float32)}
    s = {} if sent is None else {"w": torch.tensor(sent)}
    return Update(v, s)


def test_weighted_mean_oracle():
    out = agg.weighted_mean([_u([1.0, 2.0]), _u([3.0, 6.0])], [1, 3], ["w"])
    assert torch.allclose(out["w"], torch.tensor([2.5, 5.0]))


def test_zero_as_value_counts_unsent_as_zero():
    # client 2 did not send coordinate 0: it counts as 0 in a plain weighted mean
    ups = [_u([4.0, 2.0], [True, True]), _u([0.0, 6.0], [False, True])]
    out = agg.zero_as_value(ups, [1, 1], ["w"])
    assert out["w"].tolist() == [2.0, 4.0]


def test_per_coordinate_averages_over_senders_and_keeps_unsent():
    cur = {"w": torch.tensor([9.0, 9.0, 9.0])}
    ups = [_u([4.0, 2.0, 0.0], [True, True, False]), _u([0.0, 6.0, 0.0], [False, True, False])]
    out = agg.per_coordinate(ups, [1, 3], cur, ["w"])
    assert out["w"].tolist() == [4.0, (2.0 * 1 + 6.0 * 3) / 4, 9.0]


def test_delta_rule_unsent_delta_is_no_change_divided_by_total_n():
    cur = {"w": torch.tensor([1.0, 1.0])}
    ups = [_u([0.5, 0.0], [True, False]), _u([0.5, 1.0], [True, True])]
    out = agg.delta(ups, [1, 1], cur, ["w"])
    assert out["w"].tolist() == [1.5, 1.5]


def test_integer_buffers_are_averaged_and_keep_their_dtype():
    ups = [Update({"n": torch.tensor(3)}), Update({"n": torch.tensor(4)})]
    out = agg.weighted_mean(ups, [1, 1], ["n"])
    assert out["n"].dtype == torch.int64 and int(out["n"]) == 3


def test_sampling_is_seeded_per_round_and_distinct():
    a = sample_clients(0, 5, 100, 10)
    assert a == sample_clients(0, 5, 100, 10) and len(set(a)) == 10
    assert a != sample_clients(0, 6, 100, 10)
    assert a != sample_clients(0, 5, 100, 10, attempt=1)


def test_exponential_lr_decay_hits_both_ends():
    assert round_lr(0.1, 0.01, 1, 11) == 0.1
    assert abs(round_lr(0.1, 0.01, 11, 11) - 0.01) < 1e-12
    assert abs(round_lr(0.1, 0.01, 6, 11) - 0.1 * 0.1**0.5) < 1e-12
    assert round_lr(0.1, None, 5, 11) == 0.1


def test_weighted_mean_of_many_tensors_equals_the_per_tensor_float64_loop_bit_for_bit():
    # the flat path (tensors every client sent, one dtype) against the definition, with mixed
    # shapes, a tensor only some clients sent, an integer buffer and a float64 tensor
    g = torch.Generator().manual_seed(0)
    shapes = {"a": (3, 4), "b": (7,), "c": (2, 2, 2), "d": ()}
    ups = []
    for k in range(5):
        vals = {n: torch.randn(s, generator=g) * 10 ** (k - 2) for n, s in shapes.items()}
        vals["n"] = torch.tensor(10 + k)
        vals["e"] = torch.randn(3, generator=g, dtype=torch.float64)
        if k % 2:
            vals["part"] = torch.randn(5, generator=g)
        ups.append(Update(vals))
    ns = [3, 17, 1, 8, 40]
    names = ["a", "b", "c", "d", "e", "n", "part"]
    out = agg.weighted_mean(ups, ns, names)
    assert list(out) == names
    for name in names:
        ref = next(u.values[name] for u in ups if name in u.values)
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for u, n in zip(ups, ns):
            if name in u.values:
                acc += u.values[name].to(torch.float64) * (n / sum(ns))
        want = acc.floor().to(ref.dtype) if not ref.is_floating_point() else acc.to(ref.dtype)
        assert out[name].dtype == want.dtype and out[name].shape == want.shape
        assert torch.equal(out[name], want), name
        assert out[name].untyped_storage().nbytes() == want.numel() * want.element_size()  # no shared buffer


def test_integer_scalars_average_as_the_float64_tensor_loop():
    # the Python-float path for integer scalars (BatchNorm's step count) against the tensor
    # definition: negative, boolean, uint8 and beyond-2**53 values, odd weights
    g = torch.Generator().manual_seed(1)
    for trial in range(200):
        k = 1 + trial % 7
        ns = torch.randint(1, 1000, (k,), generator=g).tolist()
        big = 2**62 if trial % 10 == 0 else 2**20
        cases = {
            "i": [torch.tensor(int(v)) for v in torch.randint(-big, big, (k,), generator=g)],
            "b": [torch.tensor(bool(v)) for v in torch.randint(0, 2, (k,), generator=g)],
            "u": [torch.tensor(int(v), dtype=torch.uint8) for v in torch.randint(0, 256, (k,), generator=g)],
        }
        ups = [Update({n: vs[i] for n, vs in cases.items()}) for i in range(k)]
        out = agg.weighted_mean(ups, ns, list(cases))
        for name, vs in cases.items():
            acc = torch.zeros((), dtype=torch.float64)
            for v, n in zip(vs, ns):
                acc += v.to(torch.float64) * (n / sum(ns))
            want = acc.floor().to(vs[0].dtype)
            assert out[name].dtype == want.dtype and out[name].shape == () and torch.equal(out[name], want)


def test_integer_scalar_mean_below_its_dtype_converts_as_the_tensor_loop():
    # nine equal clients at int8's minimum: the float64 mean floors one below it; the result is
    # the tensor loop's conversion, not an error
    ups = [Update({"n": torch.tensor(-128, dtype=torch.int8)}) for _ in range(9)]
    acc = torch.zeros((), dtype=torch.float64)
    for u in ups:
        acc += u.values["n"].to(torch.float64) * (1 / 9)
    assert torch.equal(agg.weighted_mean(ups, [1] * 9, ["n"])["n"], acc.floor().to(torch.int8))
