"""Cold start on a fresh clone: is the first series after install as fast as the second?

Clones this repository's committed HEAD into a temporary folder (no ``__pycache__``, so no
numba cache next to the modules) with ``NUMBA_CACHE_DIR`` pointing at a new empty folder,
then does what ``bash deploy/bootstrap.sh demo`` does after installing the packages:
``synthmr warmup`` (compiles every kernel into that cache), then ``synthmr demo`` (node
round trip), and ``synthmr demo`` once more. Printed: the warm-up's seconds and what it
compiled, each demo's ``process`` stage (the series in the worker, start-up excluded) and
the ratio first / second (goal <= 1.2). ``--cold`` first runs one demo on the still empty
cache, for comparison (the cost the warm-up removes).

Uses the interpreter running this script (its packages stand in for the bootstrap's
``pip install``); the clone is imported through PYTHONPATH.

    python benchmarks/cold_start.py [--shape 12,128,128] [--cold]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"synthmr {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return dt, r.stdout


def _stage(out: str, name: str) -> float:
    # node mode prints "  node stage process", --offline "process"
    m = re.search(rf"^\s*(?:node stage )?{re.escape(name)}\s+([0-9.]+)\s*$", out, re.MULTILINE)
    if m is None:
        sys.exit(f"no '{name}' line in the demo's output:\n{out[-3000:]}")
    return float(m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="12,128,128", help="demo series Z,Y,X")
    ap.add_argument("--cold", action="store_true", help="also one demo before the warm-up")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as td:
        tmp = Path(td)
        clone = tmp / "synthmr"
        subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(clone)], check=True)
        cache = tmp / "numba-cache"
        cache.mkdir()
        env = dict(os.environ, PYTHONPATH=str(clone), NUMBA_CACHE_DIR=str(cache))
        print(f"fresh clone of {ROOT} (HEAD), empty NUMBA_CACHE_DIR; load {os.getloadavg()}")
        demo = ["demo", "--shape", args.shape]
        if args.cold:
            dt, out = _run([*demo, "--out", str(tmp / "cold")], clone, env)
            print(f"demo on the empty cache: process {_stage(out, 'process'):.2f} s ({dt:.1f} s)")
            for p in cache.rglob("*"):  # back to empty for the bootstrap's sequence
                if p.is_file():
                    p.unlink()
        dt, out = _run(["warmup"], clone, env)
        print(f"synthmr warmup: {dt:.1f} s; {out.strip().splitlines()[-1]}")
        process = []
        for i in (1, 2):
            dt, out = _run([*demo, "--out", str(tmp / f"demo{i}")], clone, env)
            process.append(_stage(out, "process"))
            print(f"demo {i}: process {process[-1]:.2f} s (whole demo {dt:.1f} s)")
        print(
            f"first / second series process: {process[0] / process[1]:.2f} (goal <= 1.2);"
            f" load {os.getloadavg()}"
        )


if __name__ == "__main__":
    main()
