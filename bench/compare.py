#!/usr/bin/env python3
"""Runs each workload in Convergence (`convergence bench --json`) and in PyTorch
(bench/pytorch_bench.py --json) with the same dtype, threads and iteration counts, one after the
other, and prints a markdown table (standard library only).

    python3 bench/compare.py [WORKLOAD ...] [--dtype f32|bf16] [--threads N] [--iters N]
        [--warmup N] [--rounds N] [--convergence target/release/convergence]
        [--python bench/.venv/bin/python]

With `--rounds N` the two sides take turns N times per workload (ours, theirs, ours, ...) and
each side's time is the median of its rounds' medians, printed with the range of the rounds: on
a shared virtual machine a slow minute then hits both sides rather than one.

Without workloads, all of them. A side that fails (e.g. a bf16 training step Convergence does
not run yet) gets its one-line error in the table instead of a time.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.dont_write_bytecode = True  # no __pycache__ in bench/
from pytorch_bench import WORKLOADS  # noqa: E402


def run(cmd, threads):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    if p.returncode != 0 or not lines:
        err = (p.stderr.strip().splitlines() or p.stdout.strip().splitlines() or [f"exit {p.returncode}"])[-1]
        return None, err.removeprefix("error: ")
    return json.loads(lines[-1]), None


def combine(results):
    """One side's rounds as one result: the median of the rounds' medians (their range kept),
    the highest peak memory; the first error if any round failed."""
    errors = [e for r, e in results if r is None]
    if errors:
        return None, errors[0]
    rs = [r for r, _ in results]
    medians = sorted(r["median_s"] for r in rs)
    n = len(medians)
    mid = medians[n // 2] if n % 2 else 0.5 * (medians[n // 2 - 1] + medians[n // 2])
    out = dict(rs[0], median_s=mid, round_range=(medians[0], medians[-1]))
    out["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in rs)
    return out, None


def seconds(r):
    lo, hi = r["round_range"]
    return f"{r['median_s']:.4f}" if lo == hi else f"{r['median_s']:.4f} ({lo:.3f}-{hi:.3f})"


def mib(r):
    return f"{r['peak_rss_bytes'] / 2**20:.0f}" if r else "-"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workloads", nargs="*", help=f"default: all ({', '.join(WORKLOADS)})")
    p.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1, help="alternate the two sides this many times")
    p.add_argument("--convergence", default=str(ROOT / "target" / "release" / "convergence"))
    p.add_argument("--python", default=str(ROOT / "bench" / ".venv" / "bin" / "python"))
    a = p.parse_args()
    unknown = [w for w in a.workloads if w not in WORKLOADS]
    if unknown:
        raise SystemExit(f"error: unknown workload `{unknown[0]}` (one of: {', '.join(WORKLOADS)})")
    if not Path(a.convergence).exists():
        raise SystemExit(f"error: {a.convergence} not found: run `cargo build --release` first")
    common = ["--dtype", a.dtype, "--iters", str(a.iters), "--warmup", str(a.warmup), "--json"]
    print(
        "| workload | dtype | threads | convergence s | pytorch s | ratio (pytorch/convergence) "
        "| peak RSS convergence MiB | peak RSS pytorch MiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for w in a.workloads or WORKLOADS:
        sides = (
            [a.convergence, "--threads", str(a.threads), "bench", w, *common],
            [a.python, str(ROOT / "bench" / "pytorch_bench.py"), w, "--threads", str(a.threads), *common],
        )
        rounds = [[run(cmd, a.threads) for cmd in sides] for _ in range(max(a.rounds, 1))]
        (ours, our_err), (theirs, their_err) = (combine([r[i] for r in rounds]) for i in (0, 1))
        ratio = f"{theirs['median_s'] / ours['median_s']:.3f}x" if ours and theirs else "-"
        cells = [
            w,
            a.dtype,
            str(a.threads),
            seconds(ours) if ours else f"error: {our_err}",
            seconds(theirs) if theirs else f"error: {their_err}",
            ratio,
            mib(ours),
            mib(theirs),
        ]
        print("| " + " | ".join(c.replace("|", "/") for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
