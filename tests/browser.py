"""A real headless Chromium from Debian's packages (``chromium``, ``chromium-driver``),
driven by selenium with the driver path given (selenium downloads nothing then).
Shared by tests/test_web_browser.py and benchmarks/web_page_load.py."""

from __future__ import annotations

import base64
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
)


def chromium_paths() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def start_chromium() -> Any:
    """A selenium WebDriver on a fresh profile in a temporary directory."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    paths = chromium_paths()
    if paths is None:
        raise RuntimeError("chromium and chromedriver are needed (apt: chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = paths[0]
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tempfile.mkdtemp(prefix='synthmr-chromium-')}")
    driver = webdriver.Chrome(service=Service(paths[1]), options=opts)
    driver.set_page_load_timeout(30)
    return driver


def login(driver: Any, base: str, user: str, password: str, next_path: str = "/series") -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{base}/login?next={next_path}")
    driver.find_element(By.ID, "username").send_keys(user)
    driver.find_element(By.ID, "password").send_keys(password)
    driver.find_element(By.ID, "login-button").click()


def wait_js(driver: Any, script: str, timeout: float = 30.0) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(
        lambda d: d.execute_script(script)
    )


def canvas_grey(driver: Any, element_id: str = "image") -> np.ndarray:
    """The canvas' pixels as uint8 ``[rows, columns]`` (the red channel; the tuner draws grey)."""
    data = driver.execute_script(
        """const c = document.getElementById(arguments[0]);
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let s = ''; for (let i = 0; i < d.length; i += 4) s += String.fromCharCode(d[i]);
        return [c.height, c.width, btoa(s)];""",
        element_id,
    )
    rows, cols, b64 = data
    return np.frombuffer(base64.b64decode(b64), np.uint8).reshape(rows, cols)


def page_load_ms(driver: Any) -> float:
    """Navigation start -> load event end of the current page (Navigation Timing)."""
    return float(
        driver.execute_script(
            "const n = performance.getEntriesByType('navigation')[0];"
            " return n.loadEventEnd - n.startTime;"
        )
    )


def screenshot(driver: Any, path: Path, full_page: bool = False) -> Path:
    """The window as PNG; ``full_page``: the whole document (up to 3000 px tall)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    size = driver.get_window_size()
    if full_page:
        height = int(driver.execute_script("return document.documentElement.scrollHeight"))
        driver.set_window_size(size["width"], min(max(height + 140, size["height"]), 3000))
    try:
        driver.save_screenshot(str(path))
    finally:
        if full_page:
            driver.set_window_size(size["width"], size["height"])
    return path


#: The reading room's pages of one series and when each is ready to read: every image
#: decoded, or (tuner) the first contrast of the whole volume drawn.
ALL_IMAGES = "return [...document.images].every(i => i.complete && i.naturalWidth > 0)"
PAGE_READY = {
    "series": ("/series", None),
    "detail": ("/series/{uid}", ALL_IMAGES),
    "tuner": (
        "/series/{uid}/tuner",
        "return window.synthmrTuner && window.synthmrTuner.renders > 0",
    ),
    "report": ("/series/{uid}/report", ALL_IMAGES),
}


def serve_stored_phantom(
    tmp: Path, shape: tuple[int, int, int], patient: dict[str, str] | None = None
) -> tuple[Any, str, dict[str, float]]:
    """A phantom MDME series (GE layout) processed in process and stored as the node stores
    it (report pre-rendered as the node does), its instances in a registry (COMPLETE), and
    the web app on 127.0.0.1 (uvicorn, as ``synthmr serve`` runs it; user ``bench``/``bench``,
    operator). Returns (server, series UID, seconds: process_and_store, report_render)."""
    import time

    import pydicom

    from dicom_node import emulator, vendors
    from dicom_node.registry import Registry, State
    from dicom_node.seriesstore import save_series
    from dicom_node.web.app import WebContext
    from dicom_node.web.reportdata import build_report_data, cached_render
    from dicom_node.web.server import WebServer
    from dicom_node.web.settings import WebSettings, WebUser, hash_password
    from processing.phantom import make_phantom
    from processing.run import ProcessingSettings, run

    t0 = time.perf_counter()
    ph = make_phantom(shape, seed=5, snr=50.0)
    files = emulator.write_series(ph.acq, "ge", tmp / "in", patient=patient)
    ds = [pydicom.dcmread(f) for f in files]
    result = run(vendors.normalize(ds), ProcessingSettings(enhance=False))
    uid = str(ds[0].SeriesInstanceUID)
    spool = tmp / "spool"
    save_series(spool, uid, result, ds)
    t_render = time.perf_counter()
    # the node renders the report when it processes a brain series (its DICOM PDF and SC,
    # dicom_node.pipeline -> series_report_documents): the web page then finds it cached
    cached_render(spool, uid, build_report_data(spool, uid))
    render_s = time.perf_counter() - t_render
    reg = Registry(spool / "registry.sqlite3")
    for d in ds:
        reg.add_instance(
            sop_uid=str(d.SOPInstanceUID), series_uid=uid, study_uid=str(d.StudyInstanceUID),
            sop_class_uid=str(d.SOPClassUID), path="-", size=0, calling_ae="SCANNER",
        )  # fmt: skip
    reg.transition(uid, State.COMPLETE)
    seconds = {"process_and_store": t_render - t0, "report_render": render_s}
    web = WebSettings(
        enabled=True, port=0, users=(WebUser("bench", "operator", hash_password("bench")),)
    )
    server = WebServer(WebContext(web=web, registry=reg, spool_root=spool)).start()
    return server, uid, seconds


def page_times(
    driver: Any, base: str, uid: str, repeat: int, shots: Path | None = None
) -> dict[str, dict[str, float]]:
    """Load each page of :data:`PAGE_READY` ``repeat`` times (logged in already). Per page,
    milliseconds: ``first`` (first visit until ready: includes caches being filled,
    e.g. the browser's and the tuner's map files), ``ready`` and ``load``
    (Navigation Timing loadEventEnd) as medians of the later visits (caches warm), and for
    the tuner ``first_draw`` (maps download + first synthesis in the browser)."""
    import statistics
    import time

    out: dict[str, dict[str, float]] = {}
    for name, (path, ready) in PAGE_READY.items():
        ready_ms, loads = [], []
        for _ in range(max(2, repeat + 1)):
            t = time.perf_counter()
            driver.get(base + path.format(uid=uid))
            if ready:
                wait_js(driver, ready, 60)
            ready_ms.append((time.perf_counter() - t) * 1000)
            loads.append(page_load_ms(driver))
        out[name] = {
            "first": ready_ms[0],
            "ready": statistics.median(ready_ms[1:]),
            "load": statistics.median(loads[1:]),
        }
        if name == "tuner":
            out[name]["first_draw"] = float(
                driver.execute_script(
                    "return window.synthmrTuner.loadMs + window.synthmrTuner.lastMs"
                )
            )
        if shots is not None:
            screenshot(driver, shots / f"{name}.png", full_page=name == "report")
    return out
