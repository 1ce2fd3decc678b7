"""Soak test: a long run with many faulty clients and three SIGKILLs loses nothing.

200 rounds on digits (20 clients, 10 per round) with 30% crashing, 10% NaN and 10% corrupted
clients; the `sparsefl run` process is SIGKILLed three times (when its metrics reach 1/4, 1/2 and
3/4 of the rounds) and restarted each time. Checks, and prints:

* the run finishes; its final accuracy is within 3 points of the same run without faults;
* every injected fault is accounted for: the faults the server drew (recomputed here from the
  seed) are exactly the failures recorded in metrics.jsonl, each with the matching reason;
* the killed-and-resumed run equals an uninterrupted faulty run bit for bit (model_sha256).

    python benchmarks/soak.py [--rounds 200] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sparsefl.config import load_config
from sparsefl.protocol.faults import draw_fault
from sparsefl.protocol.sampling import sample_clients

FAULTS = ["faults.crash_prob=0.3", "faults.nan_prob=0.1", "faults.corrupt_prob=0.1"]
REASON = {"crash": "crashed", "nan": "decode", "corrupt": "decode"}


def cli(out: Path, overrides: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sparsefl.cli.main", "run", "--out", str(out)]
    for o in overrides:
        cmd += ["--set", o]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def rounds_done(out: Path) -> int:
    """Complete lines of metrics.jsonl (a line torn by a kill is not a round)."""
    p = out / "metrics.jsonl"
    return p.read_text().count("\n") if p.exists() else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="sparsefl-soak-"))
    base = [f"federation.rounds={args.rounds}"]
    t0 = time.perf_counter()

    clean = cli(root / "clean", base)
    assert clean.wait() == 0, clean.stderr.read().decode()  # type: ignore[union-attr]
    straight = cli(root / "faulty-straight", [*base, *FAULTS])
    assert straight.wait() == 0, straight.stderr.read().decode()  # type: ignore[union-attr]

    killed = root / "faulty-killed"
    kills = []
    for frac in (0.25, 0.5, 0.75):
        p = cli(killed, [*base, *FAULTS])
        target = int(frac * args.rounds)
        while rounds_done(killed) < target and p.poll() is None:
            time.sleep(0.05)
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills.append(rounds_done(killed))
    last = cli(killed, [*base, *FAULTS])
    assert last.wait() == 0, last.stderr.read().decode()  # type: ignore[union-attr]

    summary = {
        k: json.loads((root / k / "summary.json").read_text()) for k in ("clean", "faulty-straight", "faulty-killed")
    }
    rows = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    cfg = load_config(overrides=[*base, *FAULTS])
    expected, recorded = [], []
    for r in rows:
        attempts = max([f["attempt"] for f in r["failures"]], default=0)
        for a in range(attempts + 1):
            for c in sample_clients(cfg.seed, r["round"], 20, 10, a):
                kind = draw_fault(cfg.faults, cfg.seed, r["round"], a, c)
                if kind is not None:
                    expected.append((r["round"], a, c, kind))
        for f in r["failures"]:
            recorded.append((r["round"], f["attempt"], f["client"], f["injected"]))
            if f["injected"] is None or REASON[f["injected"]] not in f["reason"]:
                print(f"unexplained failure: round {r['round']}: {f}")
                return 1
    by_kind = {k: sum(1 for e in expected if e[3] == k) for k in REASON}
    acc_clean = summary["clean"]["final_accuracy"]
    acc_killed = summary["faulty-killed"]["final_accuracy"]
    ok_acc = acc_killed >= acc_clean - 0.03
    ok_faults = sorted(expected) == sorted(recorded)
    ok_bits = summary["faulty-killed"]["model_sha256"] == summary["faulty-straight"]["model_sha256"]
    print(f"soak: {args.rounds} rounds, digits, 20 clients / 10 per round, faults {' '.join(FAULTS)}")
    print(f"SIGKILLs after rounds {kills}; folder {root}; {time.perf_counter() - t0:.0f} s in all")
    print(f"{'run':<18}{'final acc':>10}{'best acc':>10}{'failures':>10}  model_sha256")
    for k, s in summary.items():
        print(
            f"{k:<18}{s['final_accuracy']:>10.4f}{s['best_accuracy']:>10.4f}{s['failures_total']:>10}"
            f"  {s['model_sha256'][:16]}"
        )
    print(f"injected faults: {len(expected)} ({by_kind}); recorded failures: {len(recorded)}; match: {ok_faults}")
    print(f"accuracy within 3 points of fault-free: {ok_acc} ({acc_killed:.4f} vs {acc_clean:.4f})")
    print(f"killed+resumed == uninterrupted faulty run: {ok_bits}")
    return 0 if (ok_acc and ok_faults and ok_bits) else 1


if __name__ == "__main__":
    raise SystemExit(main())
