"""The web interface without a browser: login, roles, CSRF, 401/redirect, bind rules, audit,
stored maps, and the tuned contrast's deterministic UIDs (Starlette TestClient)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pydicom
import pytest
from starlette.testclient import TestClient

from dicom_node.config import check_config, load_settings
from dicom_node.registry import Registry, State
from dicom_node.web.app import WebContext, create_app
from dicom_node.web.server import WebServer, WebStartRefused
from dicom_node.web.settings import WebSettings, WebUser, hash_password, verify_password

VIEWER_PW, OPERATOR_PW = "look-only-1", "operate-2"


@pytest.fixture(scope="module")
def users() -> tuple[WebUser, ...]:
    return (
        WebUser("ann", "viewer", hash_password(VIEWER_PW)),
        WebUser("otto", "operator", hash_password(OPERATOR_PW)),
    )


@pytest.fixture(scope="module")
def processed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, list[Path]]:
    """A tiny phantom series processed and stored as the node stores it."""
    from dicom_node import emulator, vendors
    from dicom_node.seriesstore import save_series
    from processing.phantom import make_phantom
    from processing.run import ProcessingSettings, run

    root = tmp_path_factory.mktemp("web")
    ph = make_phantom((2, 32, 32), seed=3, snr=50.0, anatomy="ellipsoid")
    files = emulator.write_series(ph.acq, "ge", root / "in")
    ds = [pydicom.dcmread(f) for f in files]
    result = run(vendors.normalize(ds), ProcessingSettings(enhance=False))
    uid = str(ds[0].SeriesInstanceUID)
    save_series(root / "spool", uid, result, ds)
    return root / "spool", uid, files


def _ctx(spool: Path, users: tuple[WebUser, ...], **kw) -> WebContext:
    reg = Registry(spool / "registry.sqlite3")
    return WebContext(
        web=WebSettings(enabled=True, users=users), registry=reg, spool_root=spool, **kw
    )


def _login(client: TestClient, user: str, pw: str) -> str:
    page = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    r = client.post(
        "/login",
        data={"username": user, "password": pw, "csrf_token": token, "next": "/series"},
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text
    assert r.headers["location"] == "/series", r.headers["location"]
    listing = client.get("/series")
    return re.search(r'name="csrf-token" content="([^"]+)"', listing.text).group(1)


def test_password_hash_roundtrip() -> None:
    h = hash_password("s3cret")
    assert verify_password("s3cret", h)
    assert not verify_password("s3cret ", h)
    assert not verify_password("s3cret", "plain")


def test_every_page_and_api_needs_a_login(processed, users) -> None:
    spool, uid, _ = processed
    client = TestClient(create_app(_ctx(spool, users)))
    pages = ["/", "/series", f"/series/{uid}", f"/series/{uid}/tuner", f"/series/{uid}/report",
             f"/series/{uid}/thumb/T1W.png", "/audit"]  # fmt: skip
    for path in pages:
        r = client.get(path, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].startswith("/login"), path
    for path in ["/api/series", f"/api/series/{uid}", f"/api/series/{uid}/maps.bin"]:
        assert client.get(path).status_code == 401, path
    posts = ["retry", "resend", "release"]
    for path in [*(f"/series/{uid}/{p}" for p in posts), f"/api/series/{uid}/send"]:
        assert client.post(path).status_code == 401, path


def test_wrong_password_refused_and_audited(processed, users) -> None:
    spool, _, _ = processed
    ctx = _ctx(spool, users)
    client = TestClient(create_app(ctx))
    page = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    r = client.post(
        "/login",
        data={"username": "ann", "password": "nope", "csrf_token": token},
        follow_redirects=False,
    )
    assert r.headers["location"].startswith("/login?error=1")
    assert client.get("/api/series").status_code == 401
    assert ctx.registry.audit_log()[0]["action"] == "login_failed"


def test_viewer_cannot_retry_and_post_without_csrf_is_refused(processed, users) -> None:
    spool, uid, _ = processed
    retried: list[str] = []
    ctx = _ctx(spool, users, retry=lambda s: retried.append(s) or 1)
    ctx.registry.add_instance(
        sop_uid="1.2.3", series_uid=uid, study_uid="1.2", sop_class_uid="1.2.840", path="x", size=1
    )
    viewer = TestClient(create_app(ctx))
    csrf = _login(viewer, "ann", VIEWER_PW)
    assert viewer.get(f"/series/{uid}").status_code == 200
    r = viewer.post(f"/series/{uid}/retry", data={"csrf_token": csrf})
    assert r.status_code == 403 and "operator" in r.text
    operator = TestClient(create_app(ctx))
    csrf = _login(operator, "otto", OPERATOR_PW)
    r = operator.post(f"/series/{uid}/retry", data={})
    assert r.status_code == 403 and "CSRF" in r.text
    r = operator.post(f"/series/{uid}/retry", data={"csrf_token": "forged"})
    assert r.status_code == 403
    assert retried == []
    r = operator.post(f"/series/{uid}/retry", data={"csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303 and retried == [uid]
    actions = [a["action"] for a in ctx.registry.audit_log(uid)]
    assert actions[0] == "retry" and "forbidden" in actions and "csrf_refused" in actions
    who = {a["action"]: a["user"] for a in ctx.registry.audit_log(uid)}
    assert who["retry"] == "otto" and who["forbidden"] == "ann"


def test_operator_releases_a_held_series_viewer_cannot(processed, users) -> None:
    """The detail page's release button does what ``synthmr retry --release`` does."""
    spool, _, _ = processed
    ctx = _ctx(spool, users)
    reg, held = ctx.registry, "8.8"
    reg.add_instance(
        sop_uid="8.1", series_uid=held, study_uid="8", sop_class_uid="1.2", path="z", size=1
    )
    reg.transition(held, State.COMPLETE, "all cells")
    reg.enqueue(held)
    job_id, _, _ = reg.claim_job()
    outbox = [("PACS", "8.8.1", "1.2.840.10008.5.1.4.1.1.4", "out/8.8.1.dcm")]
    reg.finish_job(job_id, held, State.HELD, "QC fail: held", outbox=outbox)
    viewer = TestClient(create_app(ctx))
    _login(viewer, "ann", VIEWER_PW)
    assert "8.8" in [r["series_uid"] for r in viewer.get("/api/series?state=HELD").json()["series"]]
    assert 'value="HELD"' in viewer.get("/series").text  # the state filter offers HELD
    assert 'id="release"' not in viewer.get(f"/series/{held}").text
    operator = TestClient(create_app(ctx))
    csrf = _login(operator, "otto", OPERATOR_PW)
    page = operator.get(f"/series/{held}").text
    assert 'id="release"' in page and f'action="/series/{held}/release"' in page
    assert operator.post(f"/series/{held}/release", data={}).status_code == 403  # no CSRF
    viewer_csrf = _login(viewer, "ann", VIEWER_PW)
    r = viewer.post(f"/series/{held}/release", data={"csrf_token": viewer_csrf})
    assert r.status_code == 403 and "operator" in r.text
    assert reg.series(held).state == State.HELD and reg.outbox_of(held)["PACS"]["HELD"] == 1
    r = operator.post(f"/series/{held}/release", data={"csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303 and "released" in r.headers["location"]
    assert reg.series(held).state == State.EXPORTED
    assert (
        reg.outbox_of(held)["PACS"]["PENDING"] == 1
        and reg.outbox_of(held)["PACS"].get("HELD", 0) == 0
    )
    assert 'id="release"' not in operator.get(f"/series/{held}").text
    r = operator.post(
        f"/series/{held}/release", data={"csrf_token": csrf}, headers={"accept": "application/json"}
    )
    assert r.json()["message"].startswith("release refused")  # not HELD any more
    audit = [(a["action"], a["user"]) for a in reg.audit_log(held)]
    assert ("release", "otto") in audit and ("forbidden", "ann") in audit
    assert ("csrf_refused", "otto") in audit


def test_series_list_filters_and_detail(processed, users) -> None:
    spool, uid, _ = processed
    ctx = _ctx(spool, users)
    reg = ctx.registry
    reg.add_instance(
        sop_uid="9.1", series_uid="9.9", study_uid="9", sop_class_uid="1.2", path="y", size=1
    )
    reg.transition("9.9", State.QUARANTINED, "grid incomplete")
    client = TestClient(create_app(ctx))
    _login(client, "ann", VIEWER_PW)
    all_rows = client.get("/api/series").json()["series"]
    assert {r["series_uid"] for r in all_rows} >= {uid, "9.9"}
    q = client.get("/api/series?state=QUARANTINED").json()["series"]
    assert [r["series_uid"] for r in q] == ["9.9"] and q[0]["reason"] == "grid incomplete"
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert client.get("/api/series?to=2000-01-01").json()["series"] == []
    assert len(client.get(f"/api/series?from={today}").json()["series"]) == len(all_rows)
    d = client.get(f"/api/series/{uid}").json()
    assert d["volumes_ml"]["BPF"] > 0.5 and "T1W" in d["synthetic"] and "T1" in d["map_thumbs"]
    png = client.get(f"/series/{uid}/thumb/T1W.png")
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert client.get(f"/series/{uid}/thumb/..%2Fmeta.png").status_code == 404


def test_tuned_series_same_parameters_same_uids(processed) -> None:
    from dicom_node.export import ExportSettings
    from dicom_node.seriesstore import load_series
    from dicom_node.web.tuned import spec_from_request, tuned_series

    spool, uid, _ = processed
    stored = load_series(spool, uid)
    body = {"kind": "IR", "tr_ms": 9000, "te_ms": 90, "ti_ms": 2500}
    a = tuned_series(stored, spec_from_request(body), ExportSettings())
    b = tuned_series(stored, spec_from_request(dict(body)), ExportSettings())
    c = tuned_series(stored, spec_from_request({**body, "ti_ms": 2400}), ExportSettings())
    assert [x.SOPInstanceUID for x in a] == [x.SOPInstanceUID for x in b]
    assert a[0].SeriesInstanceUID == b[0].SeriesInstanceUID != c[0].SeriesInstanceUID
    assert (float(a[0].RepetitionTime), float(a[0].EchoTime), float(a[0].InversionTime)) == (
        9000.0, 90.0, 2500.0,
    )  # fmt: skip
    assert "SYNTHETIC" in a[0].ImageType and a[0].SeriesDescription.startswith("SYNTHETIC")
    with pytest.raises(ValueError, match="ti2_ms: required for DIR"):
        spec_from_request({"kind": "DIR", "tr_ms": 9000, "te_ms": 90, "ti_ms": 2500})


def test_public_bind_without_tls_or_users_refused(tmp_path: Path, users) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text('[web]\nenabled = true\naddress = "0.0.0.0"\nport = 8443\n')
    errors = check_config(cfg)
    assert any("not a loopback address" in e and "tls" in e for e in errors), errors
    assert any("no [[web.users]]" in e for e in errors), errors
    h = users[0].password_hash
    cfg.write_text(
        f'[web]\nenabled = true\naddress = "127.0.0.1"\n[[web.users]]\nname = "ann"\n'
        f'role = "viewer"\npassword_hash = "{h}"\n'
    )
    assert load_settings(cfg).web.users[0].name == "ann"
    reg = Registry(tmp_path / "r.sqlite3")
    with pytest.raises(WebStartRefused, match="loopback"):
        WebServer(
            WebContext(WebSettings(enabled=True, address="0.0.0.0", users=users), reg, tmp_path)
        )


def test_public_bind_with_tls_and_users_is_accepted(tmp_path: Path, users) -> None:
    cert, key = tmp_path / "web.crt", tmp_path / "web.key"
    cert.write_text("x")
    key.write_text("x")
    h = users[1].password_hash
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        f'[web]\nenabled = true\naddress = "0.0.0.0"\ntls_cert_file = "{cert}"\n'
        f'tls_key_file = "{key}"\n[[web.users]]\nname = "otto"\nrole = "operator"\n'
        f'password_hash = "{h}"\n'
    )
    assert [e for e in check_config(cfg) if e.startswith("web")] == []


def test_hash_password_command(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", "hash-password"],
        input="a long passphrase\n", capture_output=True, text=True, cwd=root,
        env=dict(os.environ, PYTHONPATH=str(root)), timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert verify_password("a long passphrase", out.stdout.strip())


def test_scanners_page_plots_the_phantom_qc_history(tmp_path: Path, users) -> None:
    from dicom_node.qc_history import QCHistory

    spool = tmp_path / "spool"
    ctx = _ctx(spool, users)
    hist = QCHistory(spool / "registry.sqlite3")

    def report(uid: str, when: str, t1_err: float) -> dict:
        return {
            "series_uid": uid, "scanner": "SN-4711", "acquired": when, "phantom": "NIST",
            "spheres": [
                {"array": "T1", "quantity": "t1_ms", "measured": True, "in_range": True,
                 "error_percent": t1_err},
                {"array": "PD", "quantity": "pd_pu", "measured": True, "in_range": True,
                 "error": -1.5},
            ],
        }  # fmt: skip

    hist.record(report("1.1", "2026-10-01T08:00:00", 2.0))
    hist.record(report("1.2", "2026-11-01T08:00:00", -3.5))
    hist.close()
    client = TestClient(create_app(ctx))
    assert client.get("/scanners", follow_redirects=False).status_code == 303
    _login(client, "ann", VIEWER_PW)
    page = client.get("/scanners").text
    assert "SN-4711" in page and "2 phantom series" in page
    assert "<b>T1</b> 3.5 %" in page and "<b>PD</b> 1.5 pu" in page  # the last phantom's
    png = client.get("/scanners/SN-4711.png")
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert client.get("/scanners/unknown.png").status_code == 404


def test_report_page_says_where_no_reference_exists_and_takes_a_site_table(
    processed, users, tmp_path: Path
) -> None:
    """A 12-year-old girl: the bundled table has no ICV range below 21 and no WM reference at
    all, and the page says both; a site table (WM curve 5-18 y) then gives WM its range."""
    import html
    import json
    import shutil

    spool_src, uid, _ = processed
    spool = tmp_path / "spool"
    shutil.copytree(spool_src / "results", spool / "results")
    meta_p = spool / "results" / uid / "meta.json"
    meta = json.loads(meta_p.read_text())
    meta["patient"].update(sex="F", age_years=12.0)
    meta_p.write_text(json.dumps(meta))

    def figure_rows(client: TestClient) -> dict[str, str]:
        page = client.get(f"/series/{uid}/report")
        assert page.status_code == 200
        rows = re.findall(r"<tr><td>(\w+)</td>(.*?)</tr>", page.text, re.S)
        return {fig: html.unescape(re.sub(r"<[^>]+>", " ", cells)) for fig, cells in rows}

    client = TestClient(create_app(_ctx(spool, users)))
    _login(client, "ann", VIEWER_PW)
    rows = figure_rows(client)
    assert "no reference range for age 12" in rows["ICV"]
    assert "no published age reference for whole-brain WM" in rows["WM"]

    site = tmp_path / "site.json"
    site.write_text(json.dumps({"figures": {"WM": [
        {"kind": "curve", "sex": "F", "ages": [5, 18], "mean": [380, 440], "low": [320, 380],
         "high": [440, 500], "source": "Site children's table 2026 (local)"}]}}))  # fmt: skip
    ctx = _ctx(spool, users)
    ctx = WebContext(
        web=WebSettings(enabled=True, users=users, reference_table=str(site)),
        registry=ctx.registry, spool_root=spool,
    )  # fmt: skip
    client = TestClient(create_app(ctx))
    _login(client, "ann", VIEWER_PW)
    rows = figure_rows(client)
    # 12 y: 380 + (7/13) * 60 = 412.3; limits 60 below and above
    assert "352 – 472" in rows["WM"] and "Site children's table 2026" in rows["WM"]
    assert "no reference range for age 12" in rows["ICV"]  # bundled figures stay


@pytest.mark.parametrize("layout", ["philips_enhanced", "siemens_xa_enhanced"])
def test_enhanced_mr_source_tuned_series_references_its_frames(
    layout: str, users, tmp_path: Path
) -> None:
    """An Enhanced MR source (one multi-frame file, or one per slice): the stored reference
    headers keep their frame numbers, so a tuned contrast made later from the stored maps
    names the source frame of each slice (ReferencedFrameNumber: the magnitude frame at
    that position), passes dciodvfy, and the tuner and report pages serve the series."""
    import subprocess

    import numpy

    from dicom_node import emulator, vendors
    from dicom_node.export import ExportSettings
    from dicom_node.seriesstore import load_series, save_series
    from dicom_node.web.tuned import spec_from_request, tuned_series
    from processing.phantom import make_phantom
    from processing.run import ProcessingSettings, run
    from tests.conftest import require_tool

    ph = make_phantom((2, 32, 32), seed=3, snr=50.0, anatomy="ellipsoid")
    files = emulator.write_series(ph.acq, layout, tmp_path / "in")
    ds = [pydicom.dcmread(f) for f in files]
    assert all("PerFrameFunctionalGroupsSequence" in d for d in ds)
    result = run(vendors.normalize(ds), ProcessingSettings(enhance=False))
    uid = str(ds[0].SeriesInstanceUID)
    spool = tmp_path / "spool"
    save_series(spool, uid, result, ds)
    stored = load_series(spool, uid)
    assert all(isinstance(n, int) for n in stored.meta["ref_frames"])

    out = tuned_series(
        stored, spec_from_request({"kind": "IR", "tr_ms": 9000, "te_ms": 90, "ti_ms": 2500}),
        ExportSettings(),
    )  # fmt: skip
    assert len(out) == 2
    by_uid = {str(d.SOPInstanceUID): d for d in ds}
    for inst in out:
        item = inst.SourceImageSequence[0]
        src = by_uid[str(item.ReferencedSOPInstanceUID)]
        frame = src.PerFrameFunctionalGroupsSequence[int(item.ReferencedFrameNumber) - 1]
        assert frame.MRImageFrameTypeSequence[0].ComplexImageComponent == "MAGNITUDE"
        pos = frame.PlanePositionSequence[0].ImagePositionPatient
        numpy.testing.assert_allclose(
            [float(v) for v in inst.ImagePositionPatient], [float(v) for v in pos], atol=1e-3
        )
    # the node's report of the series (PDF, SC, T1w/T2w PM) is made for it too (it was not:
    # the stored reference headers of Enhanced MR frames could not be written)
    from dicom_node.config import Settings
    from dicom_node.web.reportdata import series_report_documents

    docs = series_report_documents(spool, uid, ds, Settings())
    assert [d.SOPClassUID.name for d in docs] == [
        "Encapsulated PDF Storage", "Secondary Capture Image Storage", "Parametric Map Storage"
    ]  # fmt: skip
    for i, d in enumerate([out[0], *docs]):
        path = tmp_path / f"out{i}.dcm"
        d.save_as(path, enforce_file_format=True)
        r = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True)
        errors = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("Error")]
        assert errors == [], (d.SOPClassUID.name, errors)

    reg = Registry(spool / "registry.sqlite3")
    client = TestClient(
        create_app(WebContext(web=WebSettings(enabled=True, users=users), registry=reg,
                              spool_root=spool))
    )  # fmt: skip
    _login(client, "ann", VIEWER_PW)
    assert client.get(f"/series/{uid}/tuner").status_code == 200
    maps = client.get(f"/api/series/{uid}/maps.bin")
    assert maps.status_code == 200 and len(maps.content) > 2 * 32 * 32
    assert client.get(f"/series/{uid}/report").status_code == 200


def test_series_stored_in_parts_as_at_once(tmp_path: Path) -> None:
    """The node's job stores a series in parts as the worker hands them over (maps, then
    segmentation with the report's T1w/T2w ratio, then the rest): every stored array,
    thumbnail and meta.json equals save_series's in one go, and the ratio volume and
    tissue medians the report reads are those made from the stored maps."""
    import json

    import numpy as np

    from dicom_node import emulator, vendors
    from dicom_node.seriesstore import PendingSeries, load_series, save_series
    from dicom_node.web import reportdata
    from processing.phantom import make_phantom
    from processing.run import ProcessingSettings, run

    ph = make_phantom((2, 32, 32), seed=3, snr=50.0, anatomy="ellipsoid")
    ds = [pydicom.dcmread(f) for f in emulator.write_series(ph.acq, "ge", tmp_path / "in")]
    result = run(vendors.normalize(ds), ProcessingSettings(enhance=False))
    assert result.segmentation is not None and result.myelin is not None
    uid = str(ds[0].SeriesInstanceUID)
    once = load_series(save_series(tmp_path / "once", uid, result, ds).parents[1], uid)
    pending = PendingSeries(tmp_path / "parts", uid, ds)
    pending.add_maps(result)
    pending.add_segmentation(result)
    ratio = reportdata.early_ratio(result.maps)
    reportdata.early_ratio_medians(ratio, result.segmentation.fractions, pending.tmp)
    parts = load_series(pending.finish(result).parents[1], uid)
    a, b = once.arrays(), parts.arrays()
    assert list(a) == list(b) and "mypv" in a and "frac_WM" in a
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert once.meta == parts.meta
    thumbs = sorted(p.name for p in (once.path / "thumbs").iterdir())
    assert thumbs == sorted(p.name for p in (parts.path / "thumbs").iterdir())
    for name in thumbs:
        assert (once.path / "thumbs" / name).read_bytes() == (
            parts.path / "thumbs" / name
        ).read_bytes(), name
    np.testing.assert_array_equal(ratio, reportdata.ratio_volume(once))
    medians = json.loads((parts.path / "t1w_t2w.json").read_text())
    assert medians and medians == reportdata._ratio(once)
