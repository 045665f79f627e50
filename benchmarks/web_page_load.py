"""Page load times of the reading room for a 30-slice series, in Debian's headless Chromium.

A phantom MDME series (default 30 x 256 x 256, GE layout) is processed in process
(processing.run) and stored as the node stores it (dicom_node.seriesstore); the web app
runs on 127.0.0.1 (uvicorn, as in ``synthmr serve``) and Chromium loads, after a login:
the series list, the series detail (every thumbnail decoded), the contrast tuner (until
the first contrast of the whole volume is drawn: maps download + synthesis in JavaScript)
and the report. Printed: milliseconds per page (Navigation Timing loadEventEnd; the tuner
also its first-draw time), median of ``--repeat`` loads. ``--screenshots DIR`` saves one
PNG per page (the README's pictures).

    python benchmarks/web_page_load.py [--shape 30 256 256] [--repeat 5] [--screenshots DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.browser import login, page_load_ms, screenshot, start_chromium, wait_js  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(30, 256, 256))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--screenshots", type=Path, default=None)
    args = ap.parse_args()

    import pydicom

    from dicom_node import emulator, vendors
    from dicom_node.registry import Registry, State
    from dicom_node.seriesstore import save_series
    from dicom_node.web.app import WebContext
    from dicom_node.web.server import WebServer
    from dicom_node.web.settings import WebSettings, WebUser, hash_password
    from processing.phantom import make_phantom
    from processing.run import ProcessingSettings, run

    tmp = Path(tempfile.mkdtemp(prefix="synthmr-webbench-"))
    t0 = time.perf_counter()
    ph = make_phantom(tuple(args.shape), seed=5, snr=50.0)
    files = emulator.write_series(ph.acq, "ge", tmp / "in")
    ds = [pydicom.dcmread(f) for f in files]
    result = run(vendors.normalize(ds), ProcessingSettings(enhance=False))
    uid = str(ds[0].SeriesInstanceUID)
    spool = tmp / "spool"
    save_series(spool, uid, result, ds)
    reg = Registry(spool / "registry.sqlite3")
    for d in ds:
        reg.add_instance(
            sop_uid=str(d.SOPInstanceUID), series_uid=uid, study_uid=str(d.StudyInstanceUID),
            sop_class_uid=str(d.SOPClassUID), path="-", size=0, calling_ae="SCANNER",
        )  # fmt: skip
    reg.transition(uid, State.COMPLETE)
    print(f"series {args.shape[0]} x {args.shape[1]} x {args.shape[2]} ({len(files)} files)"
          f" processed and stored in {time.perf_counter() - t0:.1f} s")  # fmt: skip

    web = WebSettings(
        enabled=True, port=0, users=(WebUser("bench", "operator", hash_password("bench")),)
    )
    server = WebServer(WebContext(web=web, registry=reg, spool_root=spool)).start()
    base = f"http://127.0.0.1:{server.port}"
    driver = start_chromium()
    try:
        login(driver, base, "bench", "bench")
        wait_js(driver, "return location.pathname === '/series'")
        pages = {
            "series": (f"{base}/series", None),
            "detail": (
                f"{base}/series/{uid}",
                "return [...document.images].every(i => i.complete && i.naturalWidth > 0)",
            ),
            "tuner": (
                f"{base}/series/{uid}/tuner",
                "return window.synthmrTuner && window.synthmrTuner.renders > 0",
            ),
            "report": (
                f"{base}/series/{uid}/report",
                "return [...document.images].every(i => i.complete && i.naturalWidth > 0)",
            ),
        }
        for name, (url, ready) in pages.items():
            loads, ready_ms = [], []
            for _ in range(args.repeat):
                t = time.perf_counter()
                driver.get(url)
                if ready:
                    wait_js(driver, ready, 60)
                ready_ms.append((time.perf_counter() - t) * 1000)
                loads.append(page_load_ms(driver))
            extra = ""
            if name == "tuner":
                first = driver.execute_script(
                    "return window.synthmrTuner.loadMs + window.synthmrTuner.lastMs"
                )
                extra = f"; maps download + first synthesis in the browser {first:.0f} ms"
            print(
                f"{name:7s} load event {statistics.median(loads):6.0f} ms;"
                f" ready (all images / first contrast drawn) {statistics.median(ready_ms):6.0f} ms"
                f" (median of {args.repeat}){extra}"
            )
            if args.screenshots:
                screenshot(driver, args.screenshots / f"{name}.png")
    finally:
        driver.quit()
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
