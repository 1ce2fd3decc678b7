"""Mutation fuzzing of the codec layer: N seeded mutations of valid messages per codec.

Run ``python benchmarks/codec.py --fuzz 100000`` (or this file directly). For every codec a
pool of small valid messages (several shapes, dtypes and densities, with and without a known
mask) is mutated: bit flips, byte overwrites, header-field edits, truncation, extension,
deletion and insertion. Each mutant is decoded twice:

* *raw*: as mutated. It must raise :class:`DecodeError` or decode to exactly the original
  update; anything else decoded is a **silent corruption** (must be 0).
* *resealed*: with the CRC32 trailer recomputed, which turns the mutant into a message whose
  checksum is right, so the structural validation behind the checksum is what is tested. It
  must raise nothing but DecodeError (a **crash** otherwise; must be 0); a resealed mutant may
  decode to a different valid update (e.g. a flipped value bit), which is reported, not an error.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
import traceback
from collections import Counter

import numpy as np
import torch

from sparsefl.comm import Update, codec_names, decode_update, encode_update, spec_of
from sparsefl.comm.format import field_spans, seal
from sparsefl.errors import DecodeError


def _base_updates(codec: str, seed: int) -> list[tuple[Update, dict[str, torch.Tensor] | None]]:
    """Small valid updates exercising every mask mode and value format the codec can write."""
    g = torch.Generator().manual_seed(seed)
    sign = codec == "sign"
    out: list[tuple[Update, dict[str, torch.Tensor] | None]] = []

    def vals(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        v = torch.randn(shape, generator=g)
        return (torch.where(v > 0, 1.0, -1.0) if sign else v).to(dtype)

    for i, d in enumerate((0.0, 0.02, 0.1, 0.3, 0.7, 1.0)):
        values = {
            "conv.weight": vals((4, 3, 3, 3)),
            "fc.weight": vals((300,)),
            "fc.bias": vals((5,)),
            "bn.num_batches_tracked": torch.tensor(17 + i),
            "half": vals((3, 7), torch.float16),
            "empty": vals((0, 4)),
            "scalar": vals(()),
            "rows.weight": vals((12, 4, 3)),
        }
        sent = {
            k: torch.rand(values[k].shape, generator=g) < d
            for k in ("conv.weight", "fc.weight", "half", "empty", "scalar")
        }
        # a channel-structured mask (whole rows along dim 0): the ROWS layout
        sent["rows.weight"] = (torch.rand(12, generator=g) < d)[:, None, None].expand(12, 4, 3).clone()
        out.append((Update(values, sent), None))
        # a dense tensor with exact zeros (support coding) and a known mask
        w = torch.where(torch.rand(64, generator=g) < d, vals((64,)), 0.0)
        known = {"fc.weight": sent["fc.weight"]}
        out.append((Update({"fc.weight": values["fc.weight"], "w": w}, {"fc.weight": sent["fc.weight"]}), known))
    return out


def _mutate(data: bytes, rng: np.random.Generator, spans: list[tuple[str, int, int]]) -> bytes:
    b = bytearray(data)
    op = int(rng.integers(7))
    if op == 0:  # flip 1-3 bits
        for _ in range(int(rng.integers(1, 4))):
            i = int(rng.integers(len(b) * 8))
            b[i // 8] ^= 1 << (i % 8)
    elif op == 1:  # overwrite a byte
        b[int(rng.integers(len(b)))] = int(rng.integers(256))
    elif op in (2, 3):  # edit a header field
        hdr = [s for s in spans if not s[0].endswith(("_section", "crc32")) and s[2] > s[1]]
        _, s, e = hdr[int(rng.integers(len(hdr)))]
        i = int(rng.integers(s, e))
        how = int(rng.integers(4))
        b[i] = [int(rng.integers(256)), (b[i] + 1) % 256, (b[i] - 1) % 256, 0][how]
    elif op == 4:  # truncate
        del b[int(rng.integers(len(b))) :]
    elif op == 5:  # extend
        b += rng.integers(0, 256, int(rng.integers(1, 17)), dtype=np.uint8).tobytes()
    else:  # delete or insert in the middle
        i = int(rng.integers(len(b)))
        if rng.integers(2):
            del b[i : i + int(rng.integers(1, 9))]
        else:
            b[i:i] = rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8).tobytes()
    return bytes(b)


def _same(a: Update, b: Update) -> bool:
    return (
        a.values.keys() == b.values.keys()
        and a.sent.keys() == b.sent.keys()
        and all(x.dtype == b.values[k].dtype and torch.equal(x, b.values[k]) for k, x in a.values.items())
        and all(torch.equal(x, b.sent[k]) for k, x in a.sent.items())
    )


def fuzz_codec(codec: str, n: int, seed: int = 0) -> dict[str, int]:
    """Decode ``n`` mutants (messages that differ from a valid one) of ``codec``; count outcomes."""
    rng = np.random.default_rng([seed, sum(codec.encode())])
    pool = []
    for upd, known in _base_updates(codec, seed):
        data = encode_update(upd, codec, known=known)
        spec = spec_of(upd.values)
        ref = decode_update(data, spec, known=known)
        pool.append((data, spec, known, ref, field_spans(data)))
    counts: Counter[str] = Counter()
    crashes: list[str] = []
    while counts["cases"] < n:
        data, spec, known, ref, spans = pool[int(rng.integers(len(pool)))]
        mutant = _mutate(data, rng, spans)
        if mutant == data:  # e.g. a byte overwritten with its own value: not a case
            counts["unchanged"] += 1
            continue
        counts["cases"] += 1
        for kind, msg in (("raw", mutant), ("resealed", seal(mutant[:-4]))):
            try:
                got = decode_update(msg, spec, known=known)
            except DecodeError:
                counts[f"{kind}_rejected"] += 1
                continue
            except Exception:  # noqa: BLE001  (counting crashes is the point)
                counts[f"{kind}_crash"] += 1
                if len(crashes) < 3:
                    crashes.append(traceback.format_exc())
                continue
            if _same(got, ref):
                counts[f"{kind}_identical"] += 1
            elif kind == "raw":
                counts["raw_silent"] += 1
            else:
                counts["resealed_different"] += 1
    for c in crashes:
        print(c)
    return dict(counts)


def _timed(args: tuple[str, int, int]) -> tuple[dict[str, int], float]:
    t0 = time.perf_counter()
    counts = fuzz_codec(*args)
    return counts, time.perf_counter() - t0


def run_fuzz(n: int, seed: int = 0, codecs: list[str] | None = None, jobs: int = 1) -> dict[str, dict[str, int]]:
    """Fuzz every codec (``jobs`` processes, one codec each); print a line per codec."""
    results = {}
    names = codecs or codec_names()
    print(f"\nfuzz: {n} mutations per codec (seed {seed}); crashes and silent corruptions must be 0")
    print(
        f"{'codec':<10} {'cases':>8} {'raw rej':>8} {'raw same':>8} {'SILENT':>7} "
        f"{'rs rej':>8} {'rs same':>8} {'rs diff':>8} {'CRASH':>6} {'s':>6}"
    )
    work = [(codec, n, seed) for codec in names]
    if jobs > 1:
        with multiprocessing.Pool(jobs) as pool:
            done = pool.map(_timed, work, chunksize=1)
    else:
        done = [_timed(w) for w in work]
    for codec, (c, dt) in zip(names, done, strict=True):
        crash = c.get("raw_crash", 0) + c.get("resealed_crash", 0)
        print(
            f"{codec:<10} {c.get('cases', 0):>8} {c.get('raw_rejected', 0):>8} "
            f"{c.get('raw_identical', 0):>8} {c.get('raw_silent', 0):>7} "
            f"{c.get('resealed_rejected', 0):>8} {c.get('resealed_identical', 0):>8} "
            f"{c.get('resealed_different', 0):>8} {crash:>6} {dt:>6.1f}"
        )
        results[codec] = c
    return results


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("n", type=int, nargs="?", default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--codec", action="append")
    ap.add_argument("--jobs", type=int, default=1)
    a = ap.parse_args()
    res = run_fuzz(a.n, a.seed, a.codec, a.jobs)
    bad = sum(r.get("raw_silent", 0) + r.get("raw_crash", 0) + r.get("resealed_crash", 0) for r in res.values())
    raise SystemExit(1 if bad else 0)
