"""config: embedded defaults, TOML + env precedence, every error explained."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.config import ConfigError, check_config, load_settings


def test_embedded_defaults_load_without_a_file() -> None:
    s = load_settings(None, env={})
    assert s.node.ae_title == "SYNTHMR"
    assert s.node.port == 11112
    assert s.workers.backend == "embedded"
    assert s.destinations == ()
    ps = s.processing
    assert "FLAIR" in ps.contrasts and ps.model_path is None
    assert ps.mixture_contrasts == ("DIR",)


def test_a_mixture_contrast_that_is_not_synthesized_is_ignored(tmp_path: Path) -> None:
    p = tmp_path / "n.toml"
    p.write_text(
        '[processing]\ncontrasts = ["T1W", "FLAIR"]\nmixture_contrasts = ["DIR", "FLAIR"]\n'
    )
    assert check_config(p, env={}) == []
    ps = load_settings(p, env={}).processing
    assert ps.mixture_contrasts == ("DIR", "FLAIR")


def test_file_then_env_precedence(tmp_path: Path) -> None:
    p = tmp_path / "n.toml"
    p.write_text(
        '[node]\nport = 4000\nae_title = "FROMFILE"\n'
        '[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = 4242\n'
        '[[security.allowed_callers]]\nae_title = "MR1"\nhosts = ["127.0.0.1"]\n'
        '[vendors.ge]\ndelay_sources = ["InversionTime"]\n'
    )
    env = {"SYNTHMR_NODE__PORT": "5000", "SYNTHMR_COMPLETION__QUIET_PERIOD_S": "2.5", "OTHER": "x"}
    s = load_settings(p, env=env)
    assert s.node.port == 5000  # env beats file
    assert s.node.ae_title == "FROMFILE"  # file beats default
    assert s.completion.quiet_period_s == 2.5
    assert s.destinations[0].ae_title == "ORTHANC" and s.destinations[0].port == 4242
    assert s.security.allowed_callers[0].hosts == ("127.0.0.1",)
    assert s.vendors["ge"].delay_sources == ("InversionTime",)
    assert s.source == str(p)


@pytest.mark.parametrize(
    ("text", "env", "needle"),
    [
        ("[node]\nprot = 1\n", {}, "node.prot: unknown key (did you mean 'port'?)"),
        ("[nod]\nport = 1\n", {}, "nod: unknown key (did you mean 'node'?)"),
        ('[node]\nport = "x"\n', {}, "node.port: expected an integer"),
        ("[node]\nport = 70000\n", {}, "node.port: port 70000 out of range"),
        ('[node]\nae_title = "WAY_TOO_LONG_AE_TITLE"\n', {}, "node.ae_title"),
        ("[security.tls]\nenabled = true\n", {}, "security.tls.cert_file: a file is required"),
        (
            '[security.tls]\nenabled = true\ncert_file = "/no/such.pem"\nkey_file = "/no/k.pem"\n',
            {},
            "security.tls.cert_file: file not found: /no/such.pem",
        ),
        ("", {"SYNTHMR_WORKERS__BACKEND": "dusk"}, "workers.backend: 'dusk'"),
        ('[workers]\nbackend = "dask"\n', {}, "workers.scheduler_address: required"),
        (
            '[[destinations]]\nname = "p"\nae_title = "P"\nhost = "127.0.0.1"\n',
            {},
            "destinations[0].port: required key is missing",
        ),
        (
            "[completion]\nceiling_s = 1\nquiet_period_s = 5\n",
            {},
            "ceiling_s (1.0) must be >= quiet_period_s",
        ),
        ("[security]\nrequire_known_callers = true\n", {}, "every association would be rejected"),
        ("[node\n", {}, "not valid TOML"),
        (
            '[processing]\nmixture_contrasts = ["DIRR"]\n',
            {},
            "processing.mixture_contrasts: unknown contrast 'DIRR' (did you mean 'DIR'?)",
        ),
    ],
)
def test_check_config_explains(tmp_path: Path, text: str, env: dict[str, str], needle: str) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(text)
    errors = check_config(p, env=env)
    assert any(needle in e for e in errors), errors
    with pytest.raises(ConfigError) as info:
        load_settings(p, env=env)
    assert any(needle in e for e in info.value.errors)


def test_missing_file_is_named(tmp_path: Path) -> None:
    errors = check_config(tmp_path / "nope.toml", env={})
    assert errors == [f"{tmp_path / 'nope.toml'}: configuration file not found"]


def test_valid_file_has_no_errors(tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    p = tmp_path / "ok.toml"
    p.write_text(
        f'[security.tls]\nenabled = true\ncert_file = "{cert}"\nkey_file = "{cert}"\n'
        '[node]\nbind_address = "127.0.0.1"\n'
    )
    assert check_config(p, env={}) == []


def test_vendor_and_export_overrides_are_checked(tmp_path: Path) -> None:
    p = tmp_path / "v.toml"
    p.write_text('[vendors.ge]\nno_such_rule = 1\n[export]\nseg_type = "BLOBBY"\nbogus = 2\n')
    errors = check_config(p, env={})
    assert any("vendors.ge.no_such_rule" in e for e in errors), errors
    assert any(e.startswith("export:") for e in errors), errors
