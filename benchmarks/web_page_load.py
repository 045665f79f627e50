"""Page load times of the reading room for a 30-slice series, in Debian's headless Chromium.

A phantom MDME series (default 30 x 256 x 256, GE layout) is processed in process
(processing.run) and stored as the node stores it (dicom_node.seriesstore); the web app
runs on 127.0.0.1 (uvicorn, as in ``synthmr serve``) and Chromium loads, after a login:
the series list, the series detail (every thumbnail decoded), the contrast tuner (until
the first contrast of the whole volume is drawn: maps download + synthesis in JavaScript)
and the report (every image decoded, the rendered page among them). Printed per page, in
milliseconds: the first visit (the report's page image was rendered when the series was
processed, as the node does; the first visit still fills smaller caches) and the median of
``--repeat`` later visits (Navigation Timing loadEventEnd too). Goal: every page ready in < 1000 ms.
``--screenshots DIR`` saves one PNG per page (the README's pictures).
tests/test_web_browser.py measures the same pages with the same code (tests/browser.py).

    python benchmarks/web_page_load.py [--shape 30 256 256] [--repeat 5] [--screenshots DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.browser import login, page_times, serve_stored_phantom, start_chromium  # noqa: E402

GOAL_MS = 1000.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(30, 256, 256))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--screenshots", type=Path, default=None)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="synthmr-webbench-"))
    # a woman of 56 (the phantom's birth date and study date): the report's sex-specific
    # reference ranges apply
    server, uid, secs = serve_stored_phantom(tmp, tuple(args.shape), {"PatientSex": "F"})
    z, y, x = args.shape
    print(
        f"series {z} x {y} x {x} processed and stored in {secs['process_and_store']:.1f} s;"
        f" report rendered {secs['report_render']:.1f} s (at processing, as the node does)"
    )
    base = f"http://127.0.0.1:{server.port}"
    driver = start_chromium()
    try:
        login(driver, base, "bench", "bench")
        times = page_times(driver, base, uid, args.repeat, args.screenshots)
    finally:
        driver.quit()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} (2 cores)")
    worst = 0.0
    for name, t in times.items():
        extra = (
            f"; maps download + first synthesis {t['first_draw']:.0f} ms"
            if "first_draw" in t
            else ""
        )
        print(
            f"{name:7s} ready: first visit {t['first']:6.0f} ms, later {t['ready']:6.0f} ms"
            f" (median of {args.repeat}); load event {t['load']:5.0f} ms{extra}"
        )
        worst = max(worst, t["first"], t["ready"])
    print(
        f"slowest page {worst:.0f} ms: goal < {GOAL_MS:.0f} ms {'met' if worst < GOAL_MS else 'MISSED'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
