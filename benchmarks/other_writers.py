"""Other writers' header conventions x vendor layouts -> WM/GM T1 bias or quarantine.

    PYTHONPATH=$PWD python benchmarks/other_writers.py               # via synthmr process
    PYTHONPATH=$PWD python benchmarks/other_writers.py --in-process  # same path, no CLI
    PYTHONPATH=$PWD python benchmarks/other_writers.py --rows phase

Each cell: the emulator's series of the phantom in ``tests/other_writers.PHANTOM``
(ellipsoid brain 3 x 48 x 48, seed 11, no lesions, SNR 60, TR 4000 ms, delays
150/580/1900/3850 ms, TE 20/100 ms) rewritten into one convention (phase unit and rescale,
magnitude rescale, the tag holding the delay), written to disk and taken the way
``synthmr process`` does (ingest.read_paths -> series.classify -> processing.run,
fit only). Printed: median signed T1 error over pure WM / pure GM in %, or
``QUARANTINED <kind>`` with the reasons listed below the table. ``!`` marks a cell whose
outcome differs from the expected one (issue 13 done-when: none).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import other_writers as ow


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="", help="only rows whose name contains this text")
    ap.add_argument("--layouts", default=",".join(ow.LAYOUTS), help="comma-separated")
    ap.add_argument("--in-process", action="store_true", help="skip the CLI and the export")
    args = ap.parse_args()
    rows = [r for r in ow.ROWS if args.rows in r.name]
    layouts = [s for s in args.layouts.split(",") if s]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="synthmr-writers-") as tmp:
        run = ow.run_table if args.in_process else ow.run_table_cli
        cells = run(tmp, rows, layouts)
    how = "in process" if args.in_process else "synthmr process"
    print(
        f"phantom {ow.PHANTOM}: cells = WM/GM median signed T1 error "
        f"({len(cells)} series through {how}, {time.perf_counter() - t0:.0f} s)"
    )
    print(ow.format_table(cells))
    wrong = [c for c in cells if c.outcome != c.expected]
    over = [
        c
        for c in cells
        if c.outcome == "fit"
        and not c.row.startswith("magnitude only")
        and max(abs(c.wm_t1_bias), abs(c.gm_t1_bias)) > 0.01
    ]
    print(
        f"\nunexpected outcomes: {len(wrong)}; fitted phase/real series with |bias| > 1 %: "
        f"{len(over)}"
    )
    return 1 if wrong or over else 0


if __name__ == "__main__":
    raise SystemExit(main())
