"""Deployment artefacts in deploy/: each one checked by the real tool that consumes it.

- Prometheus: ``promtool check rules/config``, ``promtool test rules`` (the alert unit tests
  in deploy/prometheus/alerts_test.yml), and a real Prometheus on loopback scraping a running
  node's metrics endpoint, evaluating the alert rules and the dashboard's queries.
- Every metric name used by the dashboard and the alert rules exists on the node's /metrics.
- Compose: the compose-spec JSON schema (check-jsonschema's vendored copy) + the wiring the
  node needs (config, spool volume, ports, Prometheus/Grafana mounts).
- Kubernetes: ``kubernetes-validate --strict`` (schemas shipped in the PyPI package) + the
  wiring (PVC on the spool, probes, ports, ConfigMap = deploy/synthmr.toml).
- systemd: ``systemd-analyze verify`` where available; hardening directives present.
- Dockerfile: hadolint where available; slim base, non-root, HEALTHCHECK, VOLUME, EXPOSE.
- deploy/synthmr.toml passes the node's own config validation.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROM = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
K8S = DEPLOY / "k8s"
TOML_PATH = DEPLOY / "synthmr.toml"


# --------------------------------------------------------------------------- helpers
def _tool(name: str) -> str:
    """Path of an executable from PATH or next to this interpreter (venv), else skip."""
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.skip(f"{name} is not installed (deploy/bootstrap.sh installs it)")
    return path


def _passes(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a checker; the test fails with its output unless it exits 0."""
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a process this test started: SIGTERM, SIGKILL after 20 s."""
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _deploy_config() -> dict[str, Any]:
    return tomllib.loads(TOML_PATH.read_text("utf-8"))


def _rule_exprs() -> dict[str, str]:
    doc = yaml.safe_load((PROM / "alerts.yml").read_text())
    return {r["alert"]: r["expr"] for g in doc["groups"] for r in g["rules"]}


def _dashboard() -> dict[str, Any]:
    return json.loads((GRAFANA / "dashboards" / "synthmr.json").read_text())


def _dashboard_exprs() -> list[str]:
    dash = _dashboard()
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def _grafana_to_promql(expr: str) -> str:
    """Replace Grafana's template variables by what Grafana would send."""
    return expr.replace("$__rate_interval", "1m").replace('=~"$instance"', '=~".*"')


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bsynthmr_[a-z0-9_]+", expr))


def _exposed_names(text: str) -> set[str]:
    """Every sample name a scrape of ``text`` can produce (families expand by type)."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, fam, typ = line.split(maxsplit=3)
            names.add(fam)
            if typ == "histogram":
                names |= {f"{fam}_bucket", f"{fam}_sum", f"{fam}_count"}
            elif typ == "counter":
                names |= {f"{fam}_total", f"{fam}_created"}
            elif typ == "info":
                names.add(f"{fam}_info")
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


class _Node:
    """A real node: ``synthmr serve`` in a subprocess, DICOM and metrics on free loopback
    ports, spool in tmp, stopped by PID (SIGTERM, then SIGKILL)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = _free_port()
        self.dicom_port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._start_service()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url("/healthz"), timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"synthmr serve exited: {self.proc.stderr.read()[-3000:]!r}")
            time.sleep(0.2)
        raise AssertionError("the node's /healthz did not answer within 120 s")

    def _start_service(self) -> None:
        cfg = self.tmp / "node.toml"
        cfg.write_text(
            "[node]\n"
            'bind_address = "127.0.0.1"\n'
            f"port = {self.dicom_port}\n"
            "[spool]\n"
            f'path = "{self.tmp / "spool"}"\n'
            "min_free_bytes = 0\n"
            "[metrics]\n"
            'address = "127.0.0.1"\n'
            f"port = {self.port}\n"
            "[processing]\n"
            "enhance = false\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("SYNTHMR_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(cfg)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.url("/metrics"), timeout=5) as r:
            return r.read().decode()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture(scope="module")
def _module_node(tmp_path_factory: pytest.TempPathFactory):
    n = _Node(tmp_path_factory.mktemp("node"))
    n.start()
    yield n
    n.stop()


@pytest.fixture
def node(_module_node: _Node) -> _Node:
    """One node for the module's tests (a start costs seconds); started again if a test
    stopped it (the Prometheus test stops it last, to see the alert)."""
    if _module_node.proc is None or _module_node.proc.poll() is not None:
        _module_node.start()
    return _module_node


# --------------------------------------------------------------------------- Prometheus
@pytest.mark.integration
def test_promtool_check_rules() -> None:
    promtool = _tool("promtool")
    r = _passes([promtool, "check", "rules", str(PROM / "alerts.yml")])
    n_rules = len(_rule_exprs())
    assert f"SUCCESS: {n_rules} rules found" in r.stdout + r.stderr


@pytest.mark.integration
def test_promtool_check_config() -> None:
    promtool = _tool("promtool")
    _passes([promtool, "check", "config", str(PROM / "prometheus.yml")])


@pytest.mark.integration
def test_alert_rules_unit_tests() -> None:
    """deploy/prometheus/alerts_test.yml: each alert fires on its scenario, and only then."""
    promtool = _tool("promtool")
    _passes([promtool, "test", "rules", str(PROM / "alerts_test.yml")], cwd=PROM)
    # Every alert of alerts.yml is exercised by at least one test case.
    tests = (PROM / "alerts_test.yml").read_text()
    untested = [a for a in _rule_exprs() if f"alertname: {a}\n" not in tests]
    assert not untested, f"alerts without a promtool unit test: {untested}"


def test_alert_rules_cover_the_issue_list() -> None:
    """The alerts the runbook promises: node down, stuck series, outbox backlog, dead letter,
    push failures, spool disk low, processing errors, fit QC out of range."""
    exprs = _rule_exprs()
    needed = {
        "SynthmrNodeDown": "up",
        "SynthmrSeriesStuck": "synthmr_series_oldest_age_seconds",
        "SynthmrOutboxBacklog": "synthmr_outbox_pending",
        "SynthmrDeadLetter": "synthmr_outbox_dead_letter_total",
        "SynthmrPushFailures": "synthmr_push_total",
        "SynthmrSpoolDiskLow": "synthmr_spool_free_bytes",
        "SynthmrProcessingErrors": "synthmr_processing_errors_total",
        "SynthmrFitQCOutOfRange": "synthmr_fit_failed_fraction",
    }
    for alert, metric in needed.items():
        assert alert in exprs, f"missing alert {alert}"
        assert metric in exprs[alert], f"{alert} does not use {metric}"
    runbook = (DEPLOY / "operations.md").read_text().lower()
    for alert in exprs:
        assert f"### {alert.lower()}" in runbook, f"runbook has no section for {alert}"


@pytest.mark.integration
def test_every_dashboard_and_rule_metric_exists_on_node_metrics(node: _Node) -> None:
    exposed = _exposed_names(node.metrics_text())
    used: dict[str, str] = {}
    for alert, expr in _rule_exprs().items():
        used.update({m: f"alert {alert}" for m in _metric_names(expr)})
    for expr in _dashboard_exprs():
        used.update({m: f"dashboard: {expr[:60]}" for m in _metric_names(expr)})
    assert len(used) >= 14, sorted(used)  # the fixed metric list of the node
    missing = {m: where for m, where in used.items() if m not in exposed}
    assert not missing, f"metrics used but not exposed by the node: {missing}"


@pytest.mark.integration
def test_healthcheck_commands_pass_on_a_live_node_and_fail_without_one(node: _Node) -> None:
    """The Dockerfile HEALTHCHECK and the compose healthcheck, run as written (only the
    port moved to the test node's), exit 0 against a live node and non-zero when nothing
    answers: a healthcheck that always passes, or never does, would go unnoticed."""
    stage_health = next(a for i, a in _dockerfile() if i == "HEALTHCHECK")
    docker_cmd = json.loads(stage_health[stage_health.index("CMD") + 3 :].strip())
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    compose_cmd = compose["services"]["synthmr"]["healthcheck"]["test"]
    assert docker_cmd[0] == compose_cmd[1] == "python" and compose_cmd[0] == "CMD"
    cfg_port = str(_deploy_config()["metrics"]["port"])
    dead_port = str(_free_port())
    for cmd, env in ((docker_cmd, "SYNTHMR_METRICS__PORT"), (compose_cmd[1:], None)):
        for port, ok in ((str(node.port), True), (dead_port, False)):
            argv = [sys.executable, *[a.replace(cfg_port, port) for a in cmd[1:]]]
            environ = {**os.environ, **({env: port} if env else {})}
            r = subprocess.run(argv, capture_output=True, text=True, env=environ, timeout=30)
            assert (r.returncode == 0) == ok, (cmd, port, r.stderr[-500:])


@pytest.mark.integration
@pytest.mark.slow
def test_real_prometheus_scrapes_node(node: _Node, tmp_path: Path) -> None:
    """A real Prometheus on loopback scrapes the node, stores synthmr_ samples, loads and
    evaluates every alert rule, accepts every dashboard query, and notices the node going down."""
    prometheus = _tool("prometheus")
    port = _free_port()
    rules = tmp_path / "alerts.yml"
    shutil.copy(PROM / "alerts.yml", rules)
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    # The shipped config with only the target and the intervals changed for the test.
    cfg["global"]["scrape_interval"] = "1s"
    cfg["global"]["evaluation_interval"] = "1s"
    cfg["rule_files"] = [str(rules)]
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "synthmr")
    job["scrape_interval"] = "1s"
    job["scrape_timeout"] = "1s"
    job["static_configs"] = [{"targets": [f"127.0.0.1:{node.port}"]}]
    cfg["scrape_configs"] = [job]
    cfg_path = tmp_path / "prometheus.yml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [
            prometheus,
            f"--config.file={cfg_path}",
            f"--web.listen-address=127.0.0.1:{port}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    api = f"http://127.0.0.1:{port}/api/v1"

    def query(q: str) -> dict[str, Any]:
        return _get_json(f"{api}/query?query={urllib.parse.quote(q)}")

    try:
        # 1. The target is up.
        deadline = time.monotonic() + 60
        health = None
        while time.monotonic() < deadline:
            try:
                targets = _get_json(f"{api}/targets")["data"]["activeTargets"]
                health = [t["health"] for t in targets if t["labels"]["job"] == "synthmr"]
                if health == ["up"]:
                    break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            time.sleep(0.5)
        assert health == ["up"], f"target health {health}"

        # 2. A synthmr_ metric is stored, with the node's version.
        from processing._version import __version__

        res = query("synthmr_build_info")["data"]["result"]
        assert [r["metric"]["version"] for r in res] == [__version__]
        res = query('synthmr_series_in_state{state="DELIVERED"}')["data"]["result"]
        assert len(res) == 1 and float(res[0]["value"][1]) == 0.0

        # A C-ECHO association reaches the node and its counter reaches Prometheus.
        _passes([_tool("echoscu"), "-aec", "SYNTHMR", "127.0.0.1", str(node.dicom_port)])
        deadline = time.monotonic() + 20
        accepted = 0.0
        while time.monotonic() < deadline and accepted < 1:
            res = query('synthmr_associations_total{result="accepted"}')["data"]["result"]
            accepted = float(res[0]["value"][1]) if res else 0.0
            time.sleep(0.5)
        assert accepted == 1.0

        # 3. Every alert rule loaded and evaluated without error.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            groups = _get_json(f"{api}/rules")["data"]["groups"]
            rules_seen = [r for g in groups for r in g["rules"]]
            if rules_seen and all(r["health"] != "unknown" for r in rules_seen):
                break  # every rule evaluated at least once
            time.sleep(0.5)
        assert {r["name"] for r in rules_seen} == set(_rule_exprs())
        bad = {r["name"]: r.get("lastError") for r in rules_seen if r["health"] != "ok"}
        assert not bad, bad
        # A healthy, idle node fires nothing (absent(up) may be pending from the evaluation
        # before the first scrape: it must clear once the target is up).
        deadline = time.monotonic() + 20
        while True:
            alerts = _get_json(f"{api}/alerts")["data"]["alerts"]
            active = {a["labels"]["alertname"]: a["state"] for a in alerts}
            if not active or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert active == {}, active

        # 4. Prometheus accepts every dashboard query (PromQL parse + evaluation).
        for expr in _dashboard_exprs():
            q = _grafana_to_promql(expr)
            if q.startswith("label_values("):
                r = _get_json(f"{api}/label/instance/values")
            else:
                r = query(q)
            assert r["status"] == "success", (expr, r)
        res = query(
            _grafana_to_promql('sum by (state) (synthmr_series_in_state{instance=~"$instance"})')
        )["data"]["result"]
        assert {r["metric"]["state"] for r in res} >= {"RECEIVING", "DELIVERED", "FAILED"}

        # 5. Stop the node: `up` drops to 0 and SynthmrNodeDown becomes pending (for: 2m).
        node.stop()
        deadline = time.monotonic() + 30
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            alerts = _get_json(f"{api}/alerts")["data"]["alerts"]
            states = {a["labels"]["alertname"]: a["state"] for a in alerts}
            if states.get("SynthmrNodeDown") == "pending":
                break
            time.sleep(0.5)
        assert states.get("SynthmrNodeDown") == "pending", states
    finally:
        _stop(proc)
        log.close()


# --------------------------------------------------------------------------- Grafana
def test_grafana_dashboard_and_provisioning() -> None:
    dash = _dashboard()
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = ds["datasources"][0]["uid"]
    assert ds["datasources"][0]["type"] == "prometheus"
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    rows = {p["title"] for p in panels if p["type"] == "row"}
    assert rows >= {
        "Throughput",
        "Latency per stage",
        "Queue and outbox",
        "Failures",
        "Disk",
        "Fit QC",
    }
    for p in panels:
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == uid, p["title"]
        assert p["targets"], p["title"]
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
    exprs = _dashboard_exprs()
    assert any(
        "histogram_quantile" in e and "synthmr_stage_duration_seconds_bucket" in e for e in exprs
    )
    # Latency per stage is grouped by stage (one line per stage).
    assert any("by (le, stage)" in e for e in exprs)
    # The provisioning provider loads the directory compose mounts the dashboard into.
    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "synthmr.yml").read_text())
    path = prov["providers"][0]["options"]["path"]
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{path}:ro" in mounts


# --------------------------------------------------------------------------- compose
@pytest.mark.integration
def test_compose_schema() -> None:
    tool = _tool("check-jsonschema")
    _passes([tool, "--builtin-schema", "vendor.compose-spec", str(DEPLOY / "compose.yaml")])


def test_compose_wiring() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    cfg = _deploy_config()
    svc = compose["services"]
    assert {"synthmr", "orthanc", "prometheus", "grafana"} <= set(svc)
    node = svc["synthmr"]
    assert node["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (DEPLOY / node["build"]["context"] / node["build"]["dockerfile"]).is_file()
    ports = " ".join(node["ports"])
    assert f"{cfg['node']['port']}:{cfg['node']['port']}" in ports
    assert f":{cfg['metrics']['port']}:{cfg['metrics']['port']}" in ports
    assert f":{cfg['web']['port']}:{cfg['web']['port']}" in ports  # the reading room
    # The config file is mounted where the image's CMD reads it, and the spool is a volume.
    assert "./synthmr.toml:/etc/synthmr/synthmr.toml:ro" in node["volumes"]
    named = [v.split(":")[0] for v in node["volumes"] if not v.startswith(".")]
    assert named and all(n in compose["volumes"] for n in named)
    spool_mount = next(v.split(":")[1] for v in node["volumes"] if not v.startswith("."))
    assert cfg["spool"]["path"].startswith(spool_mount)
    # Every bind-mounted file/dir exists in deploy/.
    for s in svc.values():
        for v in s.get("volumes", []):
            if v.startswith("."):
                assert (DEPLOY / v.split(":")[0]).exists(), v
    # Prometheus scrapes the node service at its metrics port; the PACS matches the destination.
    prom = yaml.safe_load((PROM / "prometheus.yml").read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "synthmr")
    assert job["static_configs"][0]["targets"] == [f"synthmr:{cfg['metrics']['port']}"]
    assert cfg["metrics"]["address"] == "0.0.0.0"
    orthanc = json.loads((DEPLOY / "orthanc.json").read_text())
    dest = cfg["destinations"][0]
    assert dest["host"] == "orthanc" and dest["ae_title"] == orthanc["DicomAet"]
    assert dest["port"] == orthanc["DicomPort"]


def test_deploy_config_is_valid(tmp_path: Path) -> None:
    from dicom_node.config import check_config, load_settings

    assert check_config(TOML_PATH, env={}) == []
    s = load_settings(TOML_PATH, env={})
    assert s.node.bind_address == "0.0.0.0" and s.metrics.address == "0.0.0.0"
    assert s.security.require_known_callers and s.security.allowed_callers
    # the web listens where compose/k8s publish it once enabled; enabling it without TLS and
    # users is refused, which is why the file ships it off
    assert s.web.address == "0.0.0.0" and s.web.port == 8080 and not s.web.enabled
    text = TOML_PATH.read_text()
    assert text.count('enabled = false\naddress = "0.0.0.0"') == 1
    on = tmp_path / "web_on.toml"
    on.write_text(text.replace("enabled = false\naddress", "enabled = true\naddress"))
    errors = " ".join(check_config(on, env={}))
    assert "no [[web.users]]" in errors and "tls_cert_file and tls_key_file are required" in errors


# --------------------------------------------------------------------------- Kubernetes
def _k8s_docs() -> list[dict[str, Any]]:
    docs = []
    for f in sorted(K8S.glob("*.yaml")):
        if f.name == "kustomization.yaml":
            continue
        docs += [d for d in yaml.safe_load_all(f.read_text()) if d]
    return docs


@pytest.mark.integration
def test_k8s_schema() -> None:
    tool = _tool("kubernetes-validate")
    files = [str(f) for f in sorted(K8S.glob("*.yaml")) if f.name != "kustomization.yaml"]
    r = _passes([tool, "--strict", *files])
    assert r.stdout.count("passed") == len(_k8s_docs())


def test_k8s_wiring() -> None:
    docs = _k8s_docs()
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    cfg = _deploy_config()
    # ConfigMap holds exactly deploy/synthmr.toml.
    cm = next(d for d in by_kind["ConfigMap"] if d["metadata"]["name"] == "synthmr-config")
    assert cm["data"]["synthmr.toml"] == TOML_PATH.read_text()
    # StatefulSet: spool on a PVC, config from the ConfigMap, probes on /healthz and /readyz.
    sts = next(d for d in by_kind["StatefulSet"] if d["metadata"]["name"] == "synthmr")
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    c = pod["containers"][0]
    assert spec["serviceName"] in {d["metadata"]["name"] for d in by_kind["Service"]}
    claims = {t["metadata"]["name"] for t in spec["volumeClaimTemplates"]}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    spool_vol = next(n for n, p in mounts.items() if cfg["spool"]["path"].startswith(p + "/"))
    assert spool_vol in claims
    cfg_vol = next(v for v in pod["volumes"] if v.get("configMap"))
    assert cfg_vol["configMap"]["name"] == "synthmr-config"
    assert mounts[cfg_vol["name"]] == "/etc/synthmr" and "/etc/synthmr/synthmr.toml" in c["args"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {
        "dicom": cfg["node"]["port"], "metrics": cfg["metrics"]["port"], "web": cfg["web"]["port"]
    }  # fmt: skip
    # the reading room's TLS Secret is optional (the pod starts while [web] is off), and
    # mounted apart from the ConfigMap
    tls_vol = next(v for v in pod["volumes"] if v.get("secret"))
    assert tls_vol["secret"]["optional"] is True and mounts[tls_vol["name"]] != "/etc/synthmr"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] in ports
    assert pod["securityContext"]["runAsNonRoot"] is True
    # Services: DICOM and metrics routed to named container ports that exist.
    svc = next(d for d in by_kind["Service"] if d["metadata"]["name"] == "synthmr")
    assert {p["targetPort"] for p in svc["spec"]["ports"]} == {"dicom", "metrics", "web"}
    labels = spec["template"]["metadata"]["labels"]
    for s in by_kind["Service"]:
        if s["metadata"]["name"].startswith("synthmr-dask"):
            continue
        assert s["spec"]["selector"].items() <= labels.items()
    # kustomization lists the node's manifests.
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for f in kust["resources"]:
        assert (K8S / f).is_file()


# --------------------------------------------------------------------------- systemd
@pytest.mark.integration
def test_systemd_unit_verify(tmp_path: Path) -> None:
    tool = _tool("systemd-analyze")
    text = (DEPLOY / "synthmr.service").read_text()
    m = re.search(r"^ExecStart=(\S+)", text, re.M)
    assert m and m.group(1) == "/opt/synthmr/bin/synthmr"
    # verify insists that ExecStart's binary exists: point it at this environment's script.
    exe = shutil.which("synthmr", path=str(Path(sys.executable).parent)) or sys.executable
    unit = tmp_path / "synthmr.service"
    unit.write_text(text.replace(m.group(1), exe, 1))
    r = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True)
    ours = [ln for ln in (r.stdout + r.stderr).splitlines() if "synthmr.service" in ln]
    assert r.returncode == 0 and not ours, r.stdout + r.stderr


def test_systemd_unit_hardening() -> None:
    lines = (DEPLOY / "synthmr.service").read_text().splitlines()
    kv: dict[str, list[str]] = {}
    for ln in lines:
        if "=" in ln and not ln.startswith("#"):
            k, v = ln.split("=", 1)
            kv.setdefault(k, []).append(v)
    want = {
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "Restart": "on-failure",
        "DynamicUser": "yes",
    }
    for k, v in want.items():
        assert kv.get(k) == [v], f"{k}={kv.get(k)}"
    assert kv["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert "/var/lib/synthmr" in kv["ReadWritePaths"][0].split()
    assert _deploy_config()["spool"]["path"].startswith("/var/lib/synthmr/")
    # numba needs writable+executable pages: this protection would break the fit.
    assert "MemoryDenyWriteExecute" not in kv


# --------------------------------------------------------------------------- Dockerfile
def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    out = []
    for ln in text.splitlines():
        ln = ln.strip()
        if ln and not ln.startswith("#"):
            instr, _, args = ln.partition(" ")
            out.append((instr.upper(), args.strip()))
    return out


@pytest.mark.integration
def test_hadolint() -> None:
    tool = _tool("hadolint")
    _passes([tool, str(DEPLOY / "Dockerfile")])


def test_dockerfile_contract() -> None:
    ins = _dockerfile()
    cfg = _deploy_config()
    froms = [a for i, a in ins if i == "FROM"]
    assert froms and all(f.split()[0] == "python:3.11-slim" for f in froms)
    final = len(ins) - 1 - [i for i, _ in ins][::-1].index("FROM")
    stage = ins[final:]
    users = [a for i, a in stage if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert users[-1].split(":")[0].isdigit(), "numeric UID (Kubernetes runAsNonRoot)"
    health = " ".join(a for i, a in stage if i == "HEALTHCHECK")
    assert "/healthz" in health and "urllib" in health and "curl" not in health
    volumes = " ".join(a for i, a in stage if i == "VOLUME")
    assert any(cfg["spool"]["path"].startswith(v) for v in re.findall(r'"(/[^"]+)"', volumes))
    exposed = {int(p) for i, a in stage if i == "EXPOSE" for p in a.split()}
    assert exposed == {cfg["node"]["port"], cfg["metrics"]["port"], cfg["web"]["port"]}
    # Every COPY source of the build context exists.
    for i, a in ins:
        if i == "COPY" and not a.startswith("--from"):
            for src in a.split()[:-1]:
                assert (ROOT / src).exists(), src
    entry = json.loads(next(a for i, a in stage if i == "ENTRYPOINT"))
    cmd = json.loads(next(a for i, a in stage if i == "CMD"))
    assert entry == ["synthmr"] and cmd[:2] == ["serve", "--config"]


# --------------------------------------------------------------------------- Orthanc
@pytest.mark.integration
def test_compose_orthanc_config_starts_real_orthanc(tmp_path: Path) -> None:
    """deploy/orthanc.json (the compose stack's PACS) is a valid Orthanc configuration: a real
    Orthanc starts with it (paths and ports moved to tmp / free loopback ports) and answers
    C-ECHO as the AE title the node's destination uses."""
    orthanc_bin = _tool("Orthanc")
    echoscu = _tool("echoscu")
    cfg = json.loads((DEPLOY / "orthanc.json").read_text())
    dicom_port, http_port = _free_port(), _free_port()
    cfg.update(
        StorageDirectory=str(tmp_path / "db"),
        IndexDirectory=str(tmp_path / "db"),
        DicomPort=dicom_port,
        HttpPort=http_port,
        RemoteAccessAllowed=False,
    )
    (tmp_path / "orthanc.json").write_text(json.dumps(cfg))
    log = open(tmp_path / "orthanc.log", "wb")
    proc = subprocess.Popen(
        [orthanc_bin, str(tmp_path / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT
    )
    dest = _deploy_config()["destinations"][0]
    try:
        deadline = time.monotonic() + 30
        while True:
            r = subprocess.run(
                [
                    echoscu,
                    "-aet",
                    "SYNTHMR",
                    "-aec",
                    dest["ae_title"],
                    "127.0.0.1",
                    str(dicom_port),
                ],
                capture_output=True,
                text=True,
            )
            if r.returncode == 0:
                break
            assert proc.poll() is None, (tmp_path / "orthanc.log").read_text()[-3000:]
            assert time.monotonic() < deadline, r.stdout + r.stderr
            time.sleep(0.3)
        system = _get_json(f"http://127.0.0.1:{http_port}/system")
        assert system["DicomAet"] == dest["ae_title"] == "ORTHANC"
        modalities = _get_json(f"http://127.0.0.1:{http_port}/modalities")
        assert "synthmr" in modalities
    finally:
        _stop(proc)
        log.close()
