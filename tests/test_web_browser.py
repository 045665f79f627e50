"""The reading room in a real headless Chromium (Debian's package), against the whole node:
login, the series list updating while storescu sends a series, the detail page, a retry,
the contrast tuner's pixels against processing.synthesis for every contrast kind, and
"Send to PACS" into a real Orthanc (twice: replaced, not duplicated). Screenshots of each
page go to the test's temporary directory (and to $SYNTHMR_SCREENSHOTS when set)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from dicom_node.config import load_settings
from dicom_node.logging import JsonFormatter
from dicom_node.registry import State
from dicom_node.seriesstore import load_series
from dicom_node.service import Node
from dicom_node.web.settings import hash_password
from processing.display import grey8
from processing.synthesis import ContrastKind, ContrastSpec, synthesize
from tests.browser import (
    canvas_grey,
    chromium_paths,
    login,
    page_load_ms,
    page_times,
    screenshot,
    serve_stored_phantom,
    start_chromium,
    wait_js,
)
from tests.conftest import OrthancServer, free_port, make_orthanc, storescu, wait_for, write_config

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(chromium_paths() is None, reason="needs chromium + chromium-driver"),
]

OPERATOR_PW = "operate-2"


class Stack:
    def __init__(self, node: Node, orthanc: OrthancServer, tmp: Path) -> None:
        self.node, self.orthanc, self.tmp = node, orthanc, tmp
        self.base = f"http://127.0.0.1:{node.web.port}"
        self.shots = Path(os.environ.get("SYNTHMR_SCREENSHOTS", tmp / "screenshots"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("webnode")
    orth = make_orthanc(tmp / "orthanc", start=False)
    cfg_path = orth.workdir / "orthanc.json"
    conf = json.loads(cfg_path.read_text())
    conf.update(DicomAlwaysAllowFind=True, DicomAlwaysAllowGet=True)  # the node's C-FIND/C-GET
    cfg_path.write_text(json.dumps(conf))
    orth.start()
    _earlier_visit_only_in_pacs(tmp / "visit1", orth)
    users = (
        f'[[web.users]]\nname = "otto"\nrole = "operator"\n'
        f'password_hash = "{hash_password(OPERATOR_PW)}"\n'
    )
    cfg = write_config(
        tmp,
        "[completion]\nquiet_period_s = 1.0\nceiling_s = 30\npoll_interval_s = 0.2\n"
        "[processing]\nenhance = false\n"
        f'[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\n'
        f"port = {orth.dicom_port}\ntimeout_s = 10\n"
        f'[web]\nenabled = true\naddress = "127.0.0.1"\nport = {free_port()}\n'
        'prior_sources = ["pacs"]\n' + users,
    )
    root = logging.getLogger()
    lines = _LogLines()
    level = root.level
    root.addHandler(lines)
    root.setLevel(logging.INFO)
    node = Node(load_settings(cfg), str(cfg)).start()
    try:
        stack = Stack(node, orth, tmp)
        stack.log_lines = lines.lines
        yield stack
    finally:
        node.stop()
        orth.stop()
        root.removeHandler(lines)
        root.setLevel(level)


class _LogLines(logging.Handler):
    """Every log line of the node while the module runs, formatted as the node writes them."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(JsonFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


#: the earlier visit: same patient as the mdme_series fixture, two years before, a smaller
#: brain (another phantom seed), known to PACS only (its SR was sent there directly)
VISIT1_DATE = "20240101"


def _earlier_visit_only_in_pacs(tmp: Path, orth: OrthancServer) -> dict[str, float]:
    from dicom_node import emulator, vendors
    from dicom_node.export import ExportSettings, export_all
    from processing.phantom import make_phantom
    from processing.run import ProcessingSettings, run

    ph = make_phantom((2, 32, 32), seed=11, snr=50.0, anatomy="ellipsoid")
    files = emulator.write_series(
        ph.acq, "ge", tmp / "in", study={"StudyDate": VISIT1_DATE}, seed=11
    )
    ds = [pydicom.dcmread(f) for f in files]
    result = run(vendors.normalize(ds), ProcessingSettings(enhance=False))
    out = [d for d in export_all(result, ds, ExportSettings()) if d.Modality == "SR"]
    assert len(out) == 1
    path = tmp / "sr.dcm"
    out[0].save_as(path, enforce_file_format=True)
    sent = storescu([path], orth.dicom_port, called="ORTHANC", extra=["-R"])  # the SR's class
    assert sent.returncode == 0, sent.stderr
    assert len(orth.instances()) == 1
    return dict(result.volumes_ml)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    driver = start_chromium()
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def delivered(stack: Stack, browser: Any, mdme_series: list[Path]) -> str:
    """Log in, open the list, send the series with storescu; the list shows it arrive and
    reach DELIVERED without a reload."""
    from selenium.webdriver.common.by import By

    login(browser, stack.base, "otto", OPERATOR_PW)
    wait_js(browser, "return location.pathname === '/series'")
    assert "otto (operator)" in browser.find_element(By.TAG_NAME, "header").text
    uid = str(pydicom.dcmread(mdme_series[0], stop_before_pixels=True).SeriesInstanceUID)
    assert browser.find_elements(By.CSS_SELECTOR, f'tr[data-uid="{uid}"]') == []
    storescu(mdme_series, stack.node.port)
    seen = wait_js(
        browser,
        f"const r = document.querySelector('tr[data-uid=\"{uid}\"] .badge');"
        " return r && r.textContent;",
        60,
    )
    assert seen in {s.value for s in State}
    wait_js(
        browser,
        f"const r = document.querySelector('tr[data-uid=\"{uid}\"] .badge');"
        " return r && r.textContent === 'DELIVERED';",
        180,
    )
    assert browser.execute_script("return window.synthmrSeries.polls") >= 1
    screenshot(browser, stack.shots / "series.png")
    return uid


def test_login_and_live_series_list(delivered: str, stack: Stack) -> None:
    assert stack.node.registry.series(delivered).state == State.DELIVERED
    assert stack.node.registry.audit_log()[-1]["action"] == "login"


def test_detail_page_and_retry(delivered: str, stack: Stack, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{stack.base}/series/{delivered}")
    assert page_load_ms(browser) > 0
    wait_js(browser, "return [...document.images].every(i => i.complete && i.naturalWidth > 0)")
    n_images = browser.execute_script("return document.images.length")
    stored = load_series(stack.node.spool.root, delivered)
    assert n_images == len(stored.meta["map_thumbs"]) + len(stored.meta["synthetic"])
    assert "BPF" in browser.find_element(By.ID, "volumes").text
    outbox = browser.find_element(By.ID, "outbox").text
    assert "pacs" in outbox
    screenshot(browser, stack.shots / "detail.png")
    before = len(stack.node.registry.timeline(delivered))
    browser.find_element(By.ID, "retry").click()
    msg = wait_js(
        browser, "const m = document.getElementById('message'); return m && m.textContent"
    )
    assert "re-queued" in msg, msg
    wait_for(lambda: stack.node.registry.series(delivered).state == State.DELIVERED
             and len(stack.node.registry.timeline(delivered)) > before + 2, 180)  # fmt: skip
    assert stack.node.registry.audit_log(delivered)[0]["action"] == "retry"


#: one contrast per equation family, with times a user would not find in the presets
KINDS = {
    "SE": {"kind": "SE", "tr": 700, "te": 15},
    "IR": {"kind": "IR", "tr": 9000, "te": 90, "ti": 2400},
    "PSIR": {"kind": "PSIR", "tr": 3500, "te": 12, "ti": 500},
    "DIR": {"kind": "DIR", "tr": 12000, "te": 80, "ti": 3300, "ti2": 420},
}


def test_tuner_pixels_equal_python_synthesis(delivered: str, stack: Stack, browser: Any) -> None:
    browser.get(f"{stack.base}/series/{delivered}/tuner")
    wait_js(browser, "return window.synthmrTuner && window.synthmrTuner.renders > 0", 30)
    stored = load_series(stack.node.spool.root, delivered)
    maps = stored.quant_maps()
    z = int(browser.execute_script("return +document.getElementById('slice').value"))
    for name, p in KINDS.items():
        browser.execute_script("window.synthmrTuner.set(arguments[0])", p)
        got = canvas_grey(browser)
        spec = ContrastSpec(
            name, ContrastKind(p["kind"]), p["tr"], p["te"], p.get("ti"), p.get("ti2")
        )
        syn = synthesize(maps, spec)
        want = grey8(syn.image[z], syn.window_center, syn.window_width)
        diff = np.abs(got.astype(int) - want.astype(int))
        assert diff.max() <= 1, f"{name}: max grey difference {diff.max()}"
        assert np.ptp(want) > 100, f"{name}: the comparison needs contrast"
        if name == "IR":
            screenshot(browser, stack.shots / "tuner.png")


def _orthanc_series(orth: OrthancServer, series_uid: str) -> list[dict[str, Any]]:
    out = []
    for sid in orth.rest("/series"):
        s = orth.rest(f"/series/{sid}")
        if s["MainDicomTags"].get("SeriesInstanceUID") == series_uid:
            out.append(s)
    return out


def test_tuner_send_to_pacs_twice_replaces(delivered: str, stack: Stack, browser: Any) -> None:
    browser.get(f"{stack.base}/series/{delivered}/tuner")
    wait_js(browser, "return window.synthmrTuner && window.synthmrTuner.renders > 0", 30)
    p = KINDS["IR"]
    sent_uids = []
    for _ in range(2):
        browser.execute_script(
            "window.synthmrTuner.sent = null; window.synthmrTuner.set(arguments[0])", p
        )
        browser.find_element("id", "send").click()
        res = wait_js(browser, "return window.synthmrTuner.sent")
        assert res["ok"], res
        sent_uids.append(res["data"]["series_instance_uid"])

        def stored_once(uid: str = sent_uids[-1]) -> bool:
            found = _orthanc_series(stack.orthanc, uid)
            return len(found) == 1 and len(found[0]["Instances"]) == 2

        wait_for(stored_once, 60)
    assert sent_uids[0] == sent_uids[1]
    s = _orthanc_series(stack.orthanc, sent_uids[0])
    assert len(s) == 1 and len(s[0]["Instances"]) == 2  # 2 slices, not 4
    tags = stack.orthanc.rest(f"/instances/{s[0]['Instances'][0]}/simplified-tags")
    assert (float(tags["RepetitionTime"]), float(tags["EchoTime"]), float(tags["InversionTime"])) == (
        9000.0, 90.0, 2400.0,
    )  # fmt: skip
    assert "SYNTHETIC" in tags["ImageType"]
    rows = stack.node.registry.outbox_of(delivered)["pacs"]
    assert rows["DEAD"] == 0
    actions = [a["action"] for a in stack.node.registry.audit_log(delivered)]
    assert actions.count("send_tuned") == 2


def test_report_shows_pacs_prior_and_dicom_report_is_valid(
    delivered: str, stack: Stack, browser: Any
) -> None:
    from selenium.webdriver.common.by import By

    from dicom_node.web.priors import pacs_priors

    browser.get(f"{stack.base}/series/{delivered}/report")
    table = browser.find_element(By.ID, "figures").text
    assert VISIT1_DATE in table and "PACS pacs" in table, table
    assert "mL/y" in table  # change per year from the two visits
    assert "research use" in browser.find_element(By.CLASS_NAME, "synthetic-banner").text
    wait_js(browser, "return [...document.images].every(i => i.complete && i.naturalWidth > 0)")
    screenshot(browser, stack.shots / "report.png")
    # the values shown are the earlier SR's, read back from Orthanc
    ident = load_series(stack.node.spool.root, delivered).meta["patient"]
    priors = pacs_priors(ident, stack.node.settings, list(stack.node.settings.destinations))
    visit1 = [p for p in priors if p["study_date"] == VISIT1_DATE]
    assert len(visit1) == 1 and visit1[0]["figures"]["WM"] > 0
    assert f"{visit1[0]['figures']['WM']:.1f}" in table
    # the PDF and the Secondary Capture went through the outbox, Orthanc stores them, and
    # dciodvfy finds no error
    classes = {"1.2.840.10008.5.1.4.1.1.104.1": "pdf", "1.2.840.10008.5.1.4.1.1.7": "sc"}
    found = {}
    for iid in stack.orthanc.instances():
        tags = stack.orthanc.rest(f"/instances/{iid}/simplified-tags")
        if tags.get("SOPClassUID") in classes and tags.get("StudyDate") != VISIT1_DATE:
            found[classes[tags["SOPClassUID"]]] = iid
        if "T1WT2W" in tags.get("SeriesDescription", ""):  # the ratio as a Parametric Map
            found["ratio_pm"] = iid
    assert set(found) == {"pdf", "sc", "ratio_pm"}, found
    for kind, iid in found.items():
        path = stack.tmp / f"report_{kind}.dcm"
        import urllib.request

        with urllib.request.urlopen(
            f"http://127.0.0.1:{stack.orthanc.http_port}/instances/{iid}/file"
        ) as r:
            path.write_bytes(r.read())
        out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        errors = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("Error")]
        assert errors == [], (kind, errors)
    pdf = pydicom.dcmread(stack.tmp / "report_pdf.dcm")
    assert pdf.EncapsulatedDocument[:5] == b"%PDF-" and "research use" in pdf.DocumentTitle


def test_patient_name_never_in_the_node_logs(delivered: str, stack: Stack) -> None:
    """The pages show the patient's name (behind the login); the logs never do."""
    name = str(pydicom.dcmread(sorted((stack.tmp / "visit1" / "in").glob("*.dcm"))[0]).PatientName)
    lines = stack.log_lines
    assert any(delivered in ln for ln in lines)  # the series was logged ...
    assert any('"web_' in ln or "send_tuned" in ln for ln in lines)  # ... and the web actions
    leaked = [ln for ln in lines if name in ln or name.replace("^", " ") in ln]
    assert leaked == [], leaked[:3]


def test_pages_of_a_stored_series_load_and_are_timed(
    browser: Any, tmp_path: Path, record_property: Any
) -> None:
    """The page timing of benchmarks/web_page_load.py (same code), which prints the issue's
    load-time figure for a 30 x 256 x 256 series against the 1 s goal. Not asserted:
    timings belong to the benchmark; this checks every page of a stored brain series
    (6 x 64 x 64 here: the size changes the numbers, not whether the pages get ready) gets
    ready and the numbers exist, and prints them (pytest -s)."""
    server, uid, _ = serve_stored_phantom(tmp_path, (6, 64, 64), {"PatientSex": "F"})
    try:
        base = f"http://127.0.0.1:{server.port}"
        login(browser, base, "bench", "bench")
        wait_js(browser, "return location.pathname === '/series'")
        times = page_times(browser, base, uid, repeat=2)
    finally:
        server.stop()
    assert set(times) == {"series", "detail", "tuner", "report"}
    assert times["tuner"]["first_draw"] > 0
    load = os.getloadavg()[0]
    for name, t in times.items():
        assert t["first"] > 0 and t["ready"] > 0 and t["load"] > 0, (name, t)
        record_property(f"{name}_ready_ms", round(t["ready"]))
        print(f"6-slice {name}: first {t['first']:.0f} ms, later {t['ready']:.0f} ms"
              f" (load average {load:.1f})")  # fmt: skip
