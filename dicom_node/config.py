"""Typed node settings: one TOML file + ``SYNTHMR_*`` environment overrides.

Precedence (lowest first): the embedded ``default_config.toml`` -> the user's TOML file ->
environment variables ``SYNTHMR_<SECTION>__<KEY>=value`` (e.g. ``SYNTHMR_NODE__PORT=11112``,
``SYNTHMR_SPOOL__PATH=/data/spool``). An environment value is parsed as a TOML value when it
is one (``5``, ``true``, ``["a"]``), else used as a string.

:func:`load_settings` returns frozen dataclasses or raises :class:`ConfigError` listing every
problem; :func:`check_config` returns the same problems as human-readable strings.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from dicom_node.export.settings import ExportSettings
from dicom_node.vendors.rules import VendorRules, load_rules
from dicom_node.web.settings import WebSettings, WebUser, web_errors
from processing.settings import ProcessingSettings

__all__ = [
    "AllowedCaller",
    "CompletionSettings",
    "ConfigError",
    "Destination",
    "LoggingSettings",
    "MetricsSettings",
    "NodeSettings",
    "RetentionSettings",
    "RetrySettings",
    "SecuritySettings",
    "Settings",
    "SpoolSettings",
    "TLSSettings",
    "WebSettings",
    "WebUser",
    "WorkerSettings",
    "check_config",
    "load_settings",
]

ENV_PREFIX = "SYNTHMR_"


class ConfigError(ValueError):
    """The configuration is invalid; ``errors`` lists every problem found."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("invalid configuration:\n  " + "\n  ".join(self.errors))


@dataclass(frozen=True)
class NodeSettings:
    ae_title: str = "SYNTHMR"
    bind_address: str = "0.0.0.0"
    port: int = 11112
    max_associations: int = 10
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 30.0
    network_timeout_s: float = 60.0
    #: largest PDU the SCP accepts (announced to the sender): a 256x256 image fits in one
    #: instead of 8 PDUs of 16 KiB, each of which pynetdicom decodes and dispatches in Python
    max_pdu: int = 262144
    #: a connection must finish its TLS handshake and send its A-ASSOCIATE-RQ within this
    setup_timeout_s: float = 10.0
    #: connections of one host not yet associated (silent or slow peers) beyond this are closed
    max_pending_per_host: int = 4
    #: all open connections of one host (pending + associated)
    max_connections_per_host: int = 10
    #: reject associations whose called AE title is not ``ae_title``
    require_called_ae: bool = True
    #: an instance larger than this (as received, and inflated for deflate) is refused
    max_instance_bytes: int = 256 << 20
    #: a deflated instance that inflates beyond this is refused (decompression bombs)
    max_inflated_bytes: int = 64 << 20
    #: processes that accept associations on the node's port (pynetdicom runs each
    #: association in Python threads under one GIL); the extra ones store into the same
    #: spool and record through the node process (dicom_node.acceptors). 1 = the node
    #: process alone (TLS always); 2 was faster with parallel senders in 2 of 3 runs on the
    #: 2-core machine (benchmarks/receive_throughput.py prints the A/B; default_config.toml)
    acceptor_processes: int = 1
    #: file bytes of received series the node parses ahead of their job, all series together
    #: (dicom_node.prefetch); a series that does not fit is read by its job. 0 = off
    prefetch_max_bytes: int = 256 << 20


@dataclass(frozen=True)
class AllowedCaller:
    """A calling AE title allowed to associate, optionally only from the given hosts."""

    ae_title: str
    hosts: tuple[str, ...] = ()


@dataclass(frozen=True)
class TLSSettings:
    enabled: bool = False
    cert_file: str = ""
    key_file: str = ""
    ca_file: str = ""
    require_client_cert: bool = False


@dataclass(frozen=True)
class SecuritySettings:
    require_known_callers: bool = False
    allowed_callers: tuple[AllowedCaller, ...] = ()
    tls: TLSSettings = field(default_factory=TLSSettings)


@dataclass(frozen=True)
class SpoolSettings:
    path: str = "/var/lib/synthmr/spool"
    min_free_bytes: int = 1 << 30
    #: received bytes not yet in their spool files at most (dicom_node.spool write-behind:
    #: durable in the ingest journal meanwhile, copied from its log). 0: written at once
    write_behind_bytes: int = 128 << 20


@dataclass(frozen=True)
class CompletionSettings:
    quiet_period_s: float = 10.0
    ceiling_s: float = 600.0
    poll_interval_s: float = 0.5
    #: a complete 3D-QALAS series waits this long (after its last instance, or after the
    #: last instance of a B1-map series of its study still being received + the quiet
    #: period) for a B1-map series of the same study, then is fitted without one
    b1_map_wait_s: float = 10.0


@dataclass(frozen=True)
class WorkerSettings:
    backend: str = "embedded"
    processes: int = 1
    scheduler_address: str = ""
    job_timeout_s: float = 1800.0
    debug_job_delay_s: float = 0.0


@dataclass(frozen=True)
class Destination:
    name: str
    ae_title: str
    host: str
    port: int
    timeout_s: float = 30.0
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    #: parallel associations a series' outputs are pushed over (a PACS that stores them
    #: concurrently takes them faster). The response once lost under load with 2 was
    #: pynetdicom's requestor pause race, closed in dicom_node.requestor
    associations: int = 2
    #: send an IOCM rejection note (Key Object Selection) for outputs this destination
    #: holds that a re-run with changed inputs superseded (false: leave them as they are)
    reject_superseded: bool = True


@dataclass(frozen=True)
class RetrySettings:
    max_attempts: int = 24
    base_delay_s: float = 2.0
    max_delay_s: float = 300.0
    jitter: float = 0.2
    poll_interval_s: float = 0.5


@dataclass(frozen=True)
class MetricsSettings:
    enabled: bool = True
    address: str = "127.0.0.1"
    port: int = 9110


@dataclass(frozen=True)
class RetentionSettings:
    """``days``: spool input/output files of DELIVERED/IGNORED series. ``results_days`` and
    ``results_max_gb`` (0 = no limit): ``<spool>/results/`` (dicom_node.results_retention)."""

    days: float = 7.0
    results_days: float = 90.0
    results_max_gb: float = 0.0


@dataclass(frozen=True)
class LoggingSettings:
    level: str = "INFO"
    json: bool = True


@dataclass(frozen=True)
class PhantomQCSettings:
    """[phantom_qc]: which series are phantoms (rule, then content) and how to measure them.

    A series is a phantom candidate when a ``patterns`` regex (case-insensitive) matches one
    of ``fields``; it is a phantom only if its content also is (dicom_node.phantom_node).
    """

    enabled: bool = True
    fields: tuple[str, ...] = ("PatientName", "StudyDescription")
    patterns: tuple[str, ...] = ("PHANTOM", r"(?<![A-Z0-9])QC(?![A-Z0-9])")
    phantom: str = "nist"
    version: str = ""
    certificate: str = ""
    definitions_dir: str = ""
    temperature_c: float | None = None
    erosion_mm: float = 1.0
    min_voxels: int = 10


@dataclass(frozen=True)
class Settings:
    """Everything the node needs, typed once when the TOML is loaded. ``source`` is the
    file loaded (None = defaults only). ``processing`` goes to :func:`processing.run.run`,
    ``export`` to :func:`dicom_node.export.export_all`, ``vendors`` to the vendor adapters."""

    node: NodeSettings = field(default_factory=NodeSettings)
    security: SecuritySettings = field(default_factory=SecuritySettings)
    spool: SpoolSettings = field(default_factory=SpoolSettings)
    completion: CompletionSettings = field(default_factory=CompletionSettings)
    workers: WorkerSettings = field(default_factory=WorkerSettings)
    processing: ProcessingSettings = field(default_factory=ProcessingSettings)
    export: ExportSettings = field(default_factory=ExportSettings)
    destinations: tuple[Destination, ...] = ()
    retry: RetrySettings = field(default_factory=RetrySettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    #: every vendor's rules: the defaults with the ``[vendors.<name>]`` tables applied
    vendors: dict[str, VendorRules] = field(
        default_factory=lambda: load_rules(None), metadata={"convert": "vendor_rules"}
    )
    web: WebSettings = field(default_factory=WebSettings)
    phantom_qc: PhantomQCSettings = field(default_factory=PhantomQCSettings)
    source: str | None = None


# ---------------------------------------------------------------------------- parsing


def _default_toml() -> dict[str, Any]:
    text = resources.files("dicom_node").joinpath("default_config.toml").read_text("utf-8")
    return tomllib.loads(text)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _env_overrides(env: typing.Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        if any(not p for p in parts):
            continue
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = _parse_env_value(raw)
    return out


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str, errors: list[str]) -> Any:
    """Convert a TOML value to the annotated type, appending an error on mismatch."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (value == "" and args[0] is str):
            return None  # "" in TOML = unset (e.g. processing.model_path: the shipped model)
        return _convert(value, args[0], where, errors)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a table, got {type(value).__name__} {value!r}")
            return None
        return _build(tp, value, where, errors)
    if origin is tuple:
        (item_tp, *_) = typing.get_args(tp)
        if not isinstance(value, list):
            errors.append(f"{where}: expected a list, got {type(value).__name__} {value!r}")
            return ()
        items = (_convert(v, item_tp, f"{where}[{i}]", errors) for i, v in enumerate(value))
        return tuple(v for v in items if v is not None)  # broken items are already reported
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a table, got {type(value).__name__} {value!r}")
            return {}
        item_tp = typing.get_args(tp)[1] if typing.get_args(tp) else Any
        if dataclasses.is_dataclass(item_tp):  # e.g. processing.overrides.<preset>
            built = {k: _convert(v, item_tp, f"{where}.{k}", errors) for k, v in value.items()}
            return {k: v for k, v in built.items() if v is not None}
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{where}: expected true or false, got {value!r}")
        return bool(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
            return 0
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            errors.append(f"{where}: expected a number, got {type(value).__name__} {value!r}")
            return 0.0
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            errors.append(f"{where}: expected a string, got {type(value).__name__} {value!r}")
            return str(value)
        return value
    return value


def _build(cls: Any, data: dict[str, Any], where: str, errors: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            errors.append(f"{path}: unknown key{hint}; known keys: {', '.join(sorted(fields))}")
            continue
        if fields[key].metadata.get("convert") == "vendor_rules":
            converted = _vendor_rules(value, path, errors)
        else:
            converted = _convert(value, hints[key], path, errors)
        if converted is not None or value is None:  # None = broken sub-table, keep the default
            kwargs[key] = converted
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    for n in missing:
        errors.append(f"{where}.{n}: required key is missing")
    if missing:
        return None
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a sub-table failed to convert (None); already reported
        errors.append(f"{where or 'config'}: {exc}")
        return None
    except ValueError as exc:  # the class's own check (e.g. ExportSettings.maps)
        errors.append(f"{where or 'config'}: {exc}")
        return None


def _vendor_rules(value: Any, where: str, errors: list[str]) -> dict[str, VendorRules] | None:
    """``[vendors.<name>]`` tables -> every vendor's rules (defaults + the tables)."""
    if not isinstance(value, dict) or not all(isinstance(t, dict) for t in value.values()):
        errors.append(f"{where}: expected tables [vendors.<name>]")
        return None
    try:
        return load_rules(value)
    except (ValueError, TypeError) as exc:  # names vendors.<name>.<field>
        errors.append(str(exc))
        return None


def _port_ok(errors: list[str], p: int, where: str, allow_zero: bool = False) -> None:
    lo = 0 if allow_zero else 1
    if not (lo <= p <= 65535):
        errors.append(f"{where}: port {p} out of range {lo}..65535")


def _ae_ok(errors: list[str], ae: str, where: str) -> None:
    if not ae.strip() or len(ae) > 16 or "\\" in ae or not ae.isascii():
        errors.append(f"{where}: AE title {ae!r} must be 1-16 ASCII characters without '\\'")


def _file_ok(errors: list[str], path: str, where: str) -> None:
    if not path:
        errors.append(f"{where}: a file is required")
    elif not Path(path).is_file():
        errors.append(f"{where}: file not found: {path}")


def _host_ok(errors: list[str], host: str, where: str) -> None:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not host or any(c in host for c in " /\\"):
            errors.append(f"{where}: not an IP address or host name: {host!r}")


def _validate_node(s: Settings, errors: list[str]) -> None:
    _ae_ok(errors, s.node.ae_title, "node.ae_title")
    _port_ok(errors, s.node.port, "node.port", allow_zero=True)  # 0 = pick a free port (tests)
    _host_ok(errors, s.node.bind_address, "node.bind_address")
    if s.node.max_associations < 1:
        errors.append("node.max_associations: must be >= 1")
    if not 1 <= s.node.acceptor_processes <= 16:
        errors.append("node.acceptor_processes: must be 1 to 16")
    limits = ("max_pending_per_host", "max_connections_per_host")
    for name in (*limits, "max_instance_bytes", "max_inflated_bytes"):
        if getattr(s.node, name) < 1:
            errors.append(f"node.{name}: must be >= 1")
    for name in ("acse_timeout_s", "dimse_timeout_s", "network_timeout_s", "setup_timeout_s"):
        if getattr(s.node, name) <= 0:
            errors.append(f"node.{name}: must be > 0 seconds")
    for i, c in enumerate(s.security.allowed_callers):
        _ae_ok(errors, c.ae_title, f"security.allowed_callers[{i}].ae_title")
        for j, h in enumerate(c.hosts):
            _host_ok(errors, h, f"security.allowed_callers[{i}].hosts[{j}]")
    if s.security.require_known_callers and not s.security.allowed_callers:
        errors.append(
            "security.require_known_callers: true but no [[security.allowed_callers]]: "
            "every association would be rejected"
        )
    tls = s.security.tls
    if tls.enabled:
        _file_ok(errors, tls.cert_file, "security.tls.cert_file")
        _file_ok(errors, tls.key_file, "security.tls.key_file")
        if tls.require_client_cert:
            _file_ok(errors, tls.ca_file, "security.tls.ca_file")


def _validate_service(s: Settings, errors: list[str]) -> None:
    """spool, completion, workers, retry, metrics, logging."""
    if not s.spool.path:
        errors.append("spool.path: must not be empty")
    if s.spool.min_free_bytes < 0:
        errors.append("spool.min_free_bytes: must be >= 0")
    if s.spool.write_behind_bytes < 0:
        errors.append("spool.write_behind_bytes: must be >= 0")
    for name in ("days", "results_days", "results_max_gb"):
        if getattr(s.retention, name) < 0:
            errors.append(f"retention.{name}: must be >= 0")
    c = s.completion
    if c.quiet_period_s < 0 or c.ceiling_s <= 0 or c.poll_interval_s <= 0:
        errors.append("completion: quiet_period_s >= 0, ceiling_s > 0 and poll_interval_s > 0")
    if c.b1_map_wait_s < 0:
        errors.append("completion.b1_map_wait_s: must be >= 0")
    if c.ceiling_s < c.quiet_period_s:
        errors.append(
            f"completion.ceiling_s ({c.ceiling_s}) must be >= quiet_period_s ({c.quiet_period_s})"
        )
    w = s.workers
    if w.backend not in ("embedded", "dask"):
        errors.append(f"workers.backend: {w.backend!r} is not 'embedded' or 'dask'")
    if w.backend == "dask" and not w.scheduler_address:
        errors.append("workers.scheduler_address: required when backend = 'dask'")
    if w.processes < 1:
        errors.append("workers.processes: must be >= 1")
    r = s.retry
    if r.max_attempts < 1:
        errors.append("retry.max_attempts: must be >= 1")
    if r.base_delay_s < 0 or r.max_delay_s < r.base_delay_s:
        errors.append("retry: need 0 <= base_delay_s <= max_delay_s")
    if not (0.0 <= r.jitter <= 1.0):
        errors.append(f"retry.jitter: {r.jitter} must be within 0..1")
    if s.metrics.enabled:
        _port_ok(errors, s.metrics.port, "metrics.port", allow_zero=True)
        _host_ok(errors, s.metrics.address, "metrics.address")
    errors.extend(web_errors(s.web))
    if s.logging.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        errors.append(f"logging.level: {s.logging.level!r} is not a logging level")


def _validate_processing(p: ProcessingSettings, errors: list[str]) -> None:
    if p.slice_profile not in ("ideal", "gaussian"):
        errors.append(f"processing.slice_profile: {p.slice_profile!r} is not 'ideal' or 'gaussian'")
    if p.dir_null not in ("WM", "GM"):
        errors.append(f"processing.dir_null: {p.dir_null!r} is not 'WM' or 'GM'")
    if p.seg_output not in ("FRACTIONAL", "BINARY"):
        errors.append(f"processing.seg_output: {p.seg_output!r} is not 'FRACTIONAL' or 'BINARY'")
    if p.model_path and not Path(p.model_path).is_file():
        errors.append(f"processing.model_path: file not found: {p.model_path}")
    # here, not at the top: scipy's import (~0.7 s) is not paid by what only reads settings
    # (an acceptor process, dicom_node.acceptors)
    from processing.synthesis import PRESETS

    for key in ("contrasts", "mixture_contrasts"):
        for name in getattr(p, key):
            if name not in PRESETS:
                close = difflib.get_close_matches(name, list(PRESETS), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                errors.append(f"processing.{key}: unknown contrast {name!r}{hint}")
    for name in p.overrides:
        if name not in PRESETS:
            close = difflib.get_close_matches(name, list(PRESETS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            errors.append(f"processing.overrides.{name}: unknown contrast {name!r}{hint}")


def _validate_destinations(s: Settings, errors: list[str]) -> None:
    names: set[str] = set()
    for i, d in enumerate(s.destinations):
        where = f"destinations[{i}]"
        if d.name in names:
            errors.append(f"{where}.name: duplicate destination name {d.name!r}")
        names.add(d.name)
        _ae_ok(errors, d.ae_title, f"{where}.ae_title")
        _host_ok(errors, d.host, f"{where}.host")
        _port_ok(errors, d.port, f"{where}.port")
        if d.timeout_s <= 0:
            errors.append(f"{where}.timeout_s: must be > 0")
        if not 1 <= d.associations <= 16:
            errors.append(f"{where}.associations: must be 1..16")
        if d.tls:
            if d.ca_file:
                _file_ok(errors, d.ca_file, f"{where}.ca_file")
            if d.cert_file or d.key_file:
                _file_ok(errors, d.cert_file, f"{where}.cert_file")
                _file_ok(errors, d.key_file, f"{where}.key_file")


def _validate(s: Settings, errors: list[str]) -> None:
    """Cross-field checks after typing (types and unknown keys are checked by _build)."""
    _validate_node(s, errors)
    _validate_service(s, errors)
    _validate_processing(s.processing, errors)
    _validate_destinations(s, errors)


def _load(
    path: str | os.PathLike[str] | None, env: typing.Mapping[str, str] | None
) -> tuple[Settings | None, list[str]]:
    errors: list[str] = []
    data = _default_toml()
    source = None
    if path is not None:
        p = Path(path)
        source = str(p)
        try:
            user = tomllib.loads(p.read_text("utf-8"))
        except FileNotFoundError:
            return None, [f"{p}: configuration file not found"]
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            return None, [f"{p}: not valid TOML: {exc}"]
        data = _merge(data, user)
    data = _merge(data, _env_overrides(os.environ if env is None else env))
    settings = _build(Settings, data, "", errors)
    if settings is None:
        return None, errors
    settings = dataclasses.replace(settings, source=source)
    _validate(settings, errors)
    return settings, errors


def load_settings(
    path: str | os.PathLike[str] | None = None, env: typing.Mapping[str, str] | None = None
) -> Settings:
    """Load and validate settings; raise :class:`ConfigError` listing every problem.

    ``path=None`` uses the embedded defaults; ``env`` defaults to ``os.environ``.
    """
    settings, errors = _load(path, env)
    if errors or settings is None:
        raise ConfigError(errors)
    return settings


def check_config(
    path: str | os.PathLike[str] | None, env: typing.Mapping[str, str] | None = None
) -> list[str]:
    """Human-readable problems of a configuration file (empty list = valid)."""
    return _load(path, env)[1]
