"""Codec benchmark: bits per parameter of every codec against the entropy bound, and speed.

Usage::

    python benchmarks/codec.py                      # size table + speed (about a minute)
    python benchmarks/codec.py --json codec.json    # also write the numbers as JSON
    python benchmarks/codec.py --fuzz 100000 --jobs 2   # also N mutations per codec (must be clean)

The update is ResNet-18-sized: the shapes of ``sparsefl.models`` resnet18 (CIFAR stem, 10
classes), 11,173,962 float32 parameters in 62 tensors, values i.i.d. normal. For each density
d every tensor gets an independent Bernoulli(d) mask of sent coordinates. The bound is what
any lossless code of a float32 update must spend on average: 32 bits per sent value plus the
mask's entropy, ``32 d + H(d)`` bits per parameter (H the binary entropy); it is printed for
the nominal d and for the density the random masks actually have (the fair comparison).
``auto`` passes when it is within 3% of that bound plus 64 bytes of header per tensor.

Row-structured masks (FedSkel skeletons, gated or pruned channels): each weight tensor with
ndim >= 2 keeps whole rows along dim 0 (a Bernoulli(d) choice of output channels), 1-d tensors
(biases, BatchNorm) a Bernoulli(d) mask of their own; ``auto`` should send such masks in the
``rows`` layout, far below the ``32 d + H(d)`` of an unstructured mask, close to ``32 d``.

Speed: encode and decode of the whole update with each codec at d = 0.1, median of
``--repeats`` runs (wall time, and the process CPU time beside it, which other load on the
machine disturbs less); ``auto`` encode + decode must stay under 0.5 s on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from sparsefl.comm import Update, codec_names, decode_update, describe, encode_update, spec_of
from sparsefl.comm.entropy import binary_entropy

DENSITIES = (0.5, 0.2, 0.1, 0.05, 0.01, 0.001)
TABLE_CODECS = ("float32", "float16", "bfloat16", "bitmask", "coo", "coo-rice", "int8", "auto")
TOLERANCE = 0.03
HEADER_ALLOWANCE = 64  # bytes per tensor


def resnet18_shapes() -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the project's ResNet-18 (no model weights are needed)."""
    from sparsefl.config import ModelConfig
    from sparsefl.models import build_model

    model = build_model(ModelConfig(name="resnet18"), (3, 32, 32), 10, 0)
    return {k: tuple(p.shape) for k, p in model.named_parameters()}


def make_update(shapes: dict[str, tuple[int, ...]], d: float, seed: int) -> tuple[Update, Update]:
    """``(float update, sign update)`` sharing one random mask of density ``d``."""
    g = torch.Generator().manual_seed(seed)
    values = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    gm = torch.Generator().manual_seed(seed * 1_000_003 + round(d * 1e6))
    sent = {k: torch.rand(s, generator=gm) < d for k, s in shapes.items()}
    signs = {k: torch.where(v >= 0, 1.0, -1.0) for k, v in values.items()}
    return Update(values, sent), Update(signs, sent)


def make_row_update(shapes: dict[str, tuple[int, ...]], d: float, seed: int) -> Update:
    """A float update whose masks keep whole rows (dim 0) of every tensor with ndim >= 2."""
    g = torch.Generator().manual_seed(seed)
    values = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    gm = torch.Generator().manual_seed(seed * 1_000_003 + round(d * 1e6) + 1)
    sent = {}
    for k, s in shapes.items():
        if len(s) >= 2:
            rows = torch.rand(s[0], generator=gm) < d
            sent[k] = rows.reshape(-1, *[1] * (len(s) - 1)).expand(s).contiguous()
        else:
            sent[k] = torch.rand(s, generator=gm) < d
    return Update(values, sent)


def row_table(shapes: dict[str, tuple[int, ...]], seed: int, d: float = 0.25) -> dict:
    """Bits per parameter of a row-structured update at density ``d`` against ``32 d``."""
    n = sum(math.prod(s) for s in shapes.values())
    u = make_row_update(shapes, d, seed)
    kept = sum(int(m.sum()) for m in u.sent.values())
    dhat = kept / n
    data = encode_update(u, "auto")
    got = decode_update(data, spec_of(u.values))
    assert all(torch.equal(got.sent[k], u.sent[k]) for k in u.sent)
    assert all(torch.equal(got.values[k], u.values[k] * u.sent[k]) for k in u.values)
    infos = describe(data)
    modes: dict[str, int] = {}
    for i in infos:
        modes[i.mask_mode] = modes.get(i.mask_mode, 0) + 1
    bits = {c: 8 * len(encode_update(u, c)) / n for c in ("coo-rice", "auto")}
    row = {
        "density": d,
        "realized_density": dhat,
        "values_bound": 32 * dhat,
        "unstructured_bound": 32 * dhat + binary_entropy(dhat),
        "bits_per_param": bits,
        "auto_mask_bytes": sum(i.mask_nbytes for i in infos),
        "auto_over_values_bound": bits["auto"] / (32 * dhat),
        "mask_modes": modes,
    }
    print(
        f"\nrow-structured masks (whole output channels) at d = {d} (realized {dhat:.4f}): "
        f"bits per parameter\n{'32d':>8} {'32d+H(d)':>9} {'coo-rice':>9} {'auto':>8} {'auto/32d':>9} "
        f"{'mask B':>7}  mask modes"
    )
    print(
        f"{32 * dhat:>8.4f} {row['unstructured_bound']:>9.4f} {bits['coo-rice']:>9.4f} {bits['auto']:>8.4f} "
        f"{row['auto_over_values_bound']:>9.4f} {row['auto_mask_bytes']:>7}  "
        + ", ".join(f"{k} {v}" for k, v in sorted(modes.items()))
    )
    return row


def size_table(shapes: dict[str, tuple[int, ...]], seed: int) -> list[dict]:
    n = sum(math.prod(s) for s in shapes.values())
    t = len(shapes)
    rows = []
    print(
        f"ResNet-18 update: {n:,} float32 parameters in {t} tensors; Bernoulli(d) masks, "
        f"seed {seed}\nbits per parameter = 8 * len(message) / parameters\n"
    )
    head = f"{'d':>6} {'bound':>7} {'real bd':>7} " + " ".join(f"{c:>8}" for c in TABLE_CODECS)
    head += f" {'auto/bd':>8} {'mask/H':>7} {'ok':>3}"
    print(head)
    for d in DENSITIES:
        u, s = make_update(shapes, d, seed)
        kept = sum(int(m.sum()) for m in u.sent.values())
        dhat = kept / n
        bound = 32 * d + binary_entropy(d)
        real = 32 * dhat + binary_entropy(dhat)
        bits = {}
        for c in TABLE_CODECS:
            bits[c] = 8 * len(encode_update(u, c)) / n
        data = encode_update(u, "auto")
        assert data == encode_update(u, "auto"), "encoding is not deterministic"
        got = decode_update(data, spec_of(u.values))
        assert all(torch.equal(got.sent[k], u.sent[k]) for k in u.sent)
        assert all(torch.equal(got.values[k], u.values[k] * u.sent[k]) for k in u.values)
        infos = describe(data)
        mask_bits = 8 * sum(i.mask_nbytes for i in infos)
        header_bytes = [i.name_nbytes + i.header_nbytes for i in infos]
        # the mask's own entropy, tensor by tensor (each mask is coded on its own)
        h_mask = sum(math.prod(v.shape) * binary_entropy(float(v.float().mean())) for v in u.sent.values())
        limit = (1 + TOLERANCE) * real + 8 * HEADER_ALLOWANCE * t / n
        ok = bits["auto"] <= limit
        sign_bits = 8 * len(encode_update(s, "sign")) / n
        sign_known = 8 * len(encode_update(s, "sign", known=s.sent)) / n
        auto_sign = 8 * len(encode_update(s, "auto")) / n
        row = {
            "density": d,
            "realized_density": dhat,
            "bound": bound,
            "realized_bound": real,
            "bits_per_param": bits,
            "auto_over_realized_bound": bits["auto"] / real,
            "auto_limit": limit,
            "auto_ok": ok,
            "auto_mask_bits_over_entropy": mask_bits / h_mask,
            "auto_header_bytes_mean": sum(header_bytes) / t,
            "auto_header_bytes_max": max(header_bytes),
            "sign_bits": sign_bits,
            "sign_known_bits": sign_known,
            "auto_on_signs_bits": auto_sign,
            "sign_bound": d + binary_entropy(d),
            "int8_bound": 8 * d + binary_entropy(d),
        }
        rows.append(row)
        print(
            f"{d:>6} {bound:>7.4f} {real:>7.4f} "
            + " ".join(f"{bits[c]:>8.4f}" for c in TABLE_CODECS)
            + f" {bits['auto'] / real:>8.4f} {mask_bits / h_mask:>7.4f} {'yes' if ok else 'NO':>3}"
        )
    print(
        "\nbound = 32d + H(d); real bd = the same at the masks' realized density; auto/bd = "
        "auto / real bd;\nmask/H = auto's mask bits / the masks' entropy (sum of n_i H(d_i)); "
        f"ok = auto <= {1 + TOLERANCE} * real bd + {HEADER_ALLOWANCE} B per tensor"
    )
    print("\nsign codec on the same masks with values +-1 (bound d + H(d): 1 bit per kept value + mask):")
    print(
        f"{'d':>6} {'bound':>7} {'sign':>8} {'auto':>8} {'known':>8} {'=d':>8}  "
        f"(known: the receiver holds the mask; 1 bit per kept weight)"
    )
    for r in rows:
        print(
            f"{r['density']:>6} {r['sign_bound']:>7.4f} {r['sign_bits']:>8.4f} "
            f"{r['auto_on_signs_bits']:>8.4f} {r['sign_known_bits']:>8.4f} "
            f"{r['realized_density']:>8.4f}"
        )
    print(
        f"\nper-tensor overhead of auto (name record + tensor header): mean "
        f"{max(r['auto_header_bytes_mean'] for r in rows):.1f} bytes, max "
        f"{max(r['auto_header_bytes_max'] for r in rows)} bytes (allowance {HEADER_ALLOWANCE}); "
        f"container: 10 bytes per message"
    )
    return rows


def speed(shapes: dict[str, tuple[int, ...]], seed: int, repeats: int) -> dict:
    u, s = make_update(shapes, 0.1, seed)
    spec = spec_of(u.values)
    out = {}
    print(f"\nspeed at d = 0.1, whole update, median of {repeats} (torch threads: {torch.get_num_threads()})")
    print(f"{'codec':<10} {'encode s':>9} {'decode s':>9} {'total s':>8} {'cpu s':>8} {'MB':>8}")
    for c in codec_names():
        x = s if c == "sign" else u
        enc, dec, cpu = [], [], []
        for _ in range(repeats):
            c0 = time.process_time()
            t0 = time.perf_counter()
            data = encode_update(x, c)
            t1 = time.perf_counter()
            decode_update(data, spec)
            t2 = time.perf_counter()
            cpu.append(time.process_time() - c0)
            enc.append(t1 - t0)
            dec.append(t2 - t1)
        e, dd, cp = statistics.median(enc), statistics.median(dec), statistics.median(cpu)
        out[c] = {"encode_s": e, "decode_s": dd, "total_s": e + dd, "cpu_s": cp, "bytes": len(data)}
        print(f"{c:<10} {e:>9.3f} {dd:>9.3f} {e + dd:>8.3f} {cp:>8.3f} {len(data) / 1e6:>8.3f}")
    ok = out["auto"]["total_s"] < 0.5
    print(f"auto encode + decode: {out['auto']['total_s']:.3f} s ({'under' if ok else 'OVER'} the 0.5 s target)")
    out["auto_ok"] = ok
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, help="write the results to this JSON file")
    ap.add_argument("--fuzz", type=int, default=0, metavar="N", help="also run N mutations per codec (0 = skip)")
    ap.add_argument("--jobs", type=int, default=1, help="processes for --fuzz (one codec each)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-speed", action="store_true")
    a = ap.parse_args(argv)
    shapes = resnet18_shapes()
    result: dict = {
        "parameters": sum(math.prod(s) for s in shapes.values()),
        "tensors": len(shapes),
        "sizes": size_table(shapes, a.seed),
        "rows": row_table(shapes, a.seed),
    }
    bad = not all(r["auto_ok"] for r in result["sizes"])
    if not a.no_speed:
        result["speed"] = speed(shapes, a.seed, a.repeats)
        bad |= not result["speed"]["auto_ok"]
    if a.fuzz:
        sys.path.insert(0, str(Path(__file__).parent))
        from codec_fuzz import run_fuzz

        result["fuzz"] = run_fuzz(a.fuzz, a.seed, jobs=a.jobs)
        bad |= any(
            r.get("raw_silent", 0) + r.get("raw_crash", 0) + r.get("resealed_crash", 0) for r in result["fuzz"].values()
        )
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
