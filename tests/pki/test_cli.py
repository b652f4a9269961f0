"""``aegis ca``: init, rotate, bundle, and agent-cert against a live control plane."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509
from starlette.applications import Starlette
from typer.core import TyperGroup
from typer.main import get_command
from typer.testing import CliRunner, Result

from aegis.cli.ca import app
from aegis.cli.main import app as aegis
from aegis.config import load_config
from aegis.pki.api import PkiEndpoints
from aegis.registry.service import AgentSpec
from aegis.server.services import build_services
from tests.pki.conftest import Pki, make_csr
from tests.pki.harness import gateway_server_context, serve

runner = CliRunner()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    (tmp_path / "kek").write_text(base64.b64encode(os.urandom(32)).decode())
    path = tmp_path / "aegis.yaml"
    path.write_text("keys:\n  kek_file: kek\npki:\n  trust_domain: cli.example\n  ca_dir: ca\n")
    return path


def test_init_rotate_and_bundle(config: Path) -> None:
    result = runner.invoke(app, ["init", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "trust domain cli.example" in result.output
    again = runner.invoke(app, ["init", "--config", str(config)])
    assert again.exit_code == 1
    assert again.output.strip().splitlines() == [
        "error: conflict: a ca already exists in "
        + str(config.parent / "ca")
        + "; use --force to replace it"
    ]
    bundle = runner.invoke(app, ["bundle", "--config", str(config)])
    assert len(x509.load_pem_x509_certificates(bundle.output.encode())) == 2
    rotated = runner.invoke(app, ["rotate", "--config", str(config), "--overlap", "600"])
    assert rotated.exit_code == 0, rotated.output
    out = config.parent / "bundle.pem"
    assert runner.invoke(app, ["bundle", "--config", str(config), "--out", str(out)]).exit_code == 0
    assert len(x509.load_pem_x509_certificates(out.read_bytes())) == 3


def test_commands_without_a_ca_fail_with_one_line(config: Path) -> None:
    result = runner.invoke(app, ["rotate", "--config", str(config)])
    assert result.exit_code == 1
    assert result.output.startswith("error: config_invalid: no ca in ")
    assert result.output.count("\n") == 1


@contextmanager
def serving(pki: Pki, api: Starlette) -> Iterator[str]:
    """``api`` on a real TLS port (the "gw" agent's serving certificate), in a thread with its
    own event loop."""
    ready, stop = threading.Event(), threading.Event()
    port: list[int] = []

    async def main() -> None:
        async with serve(
            api, gateway_server_context(pki, require_client_cert=False), name="cli"
        ) as srv:
            port.append(srv.port)
            ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.05)

    thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    thread.start()
    assert ready.wait(10)
    yield f"https://127.0.0.1:{port[0]}"
    stop.set()
    thread.join(10)


@pytest.fixture
def control_plane_url(pki: Pki) -> Iterator[str]:
    """The PKI endpoints on a real TLS port."""
    with serving(
        pki, Starlette(routes=PkiEndpoints(pki.service, max_body_bytes=65536).routes())
    ) as url:
        yield url


def _enrol(pki: Pki, tmp_path: Path, url: str, *extra: str) -> Result:
    """``aegis agents cert`` for the "beta" agent at ``url``, trusting the CA's bundle."""
    bundle = tmp_path / "trust.pem"
    bundle.write_bytes(pki.ca.bundle_pem())
    client_id, secret = pki.secrets["beta"]
    args = ["agents", "cert", "--client-id", client_id, "--out-dir", str(tmp_path / "b"),
            "--bundle", str(bundle), "--url", url, *extra]  # fmt: skip
    return runner.invoke(aegis, args, env={"AEGIS_CLIENT_SECRET": secret})


def test_agent_cert_enrols_and_writes_private_files(
    pki: Pki, control_plane_url: str, tmp_path: Path
) -> None:
    bundle = tmp_path / "trust.pem"
    bundle.write_bytes(pki.ca.bundle_pem())
    client_id, secret = pki.secrets["alpha"]
    out = tmp_path / "agent"
    result = runner.invoke(
        app,
        [
            "agent-cert",
            "--url",
            control_plane_url,
            "--client-id",
            client_id,
            "--out-dir",
            str(out),
            "--bundle",
            str(bundle),
            "--lifetime",
            "120",
        ],
        env={"AEGIS_CLIENT_SECRET": secret},
    )
    assert result.exit_code == 0, result.output
    assert "spiffe://example.org/tenant/t1/env/prod/agent/alpha" in result.output
    assert secret not in result.output
    assert (out / "key.pem").stat().st_mode & 0o077 == 0
    chain = x509.load_pem_x509_certificates((out / "cert.pem").read_bytes())
    assert [c.issuer for c in chain] == [pki.ca.current.cert.subject, pki.ca.root.subject]
    wrong = runner.invoke(
        app,
        [
            "agent-cert",
            "--url",
            control_plane_url,
            "--client-id",
            client_id,
            "--out-dir",
            str(out),
            "--bundle",
            str(bundle),
        ],
        env={"AEGIS_CLIENT_SECRET": "aegis_cs_wrong"},
    )
    assert wrong.exit_code == 1
    assert wrong.output.startswith("error: invalid_client: certificate enrolment refused (401)")


def test_every_ca_command_has_help_and_json(config: Path, tmp_path: Path) -> None:
    group = get_command(app)
    assert isinstance(group, TyperGroup)
    for name in group.commands:
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)
        assert "--json" in result.output, name
    created = runner.invoke(app, ["init", "--config", str(config), "--json"])
    assert created.exit_code == 0, created.output
    facts = json.loads(created.output)
    assert facts["trust_domain"] == "cli.example"
    assert int(facts["root_serial"], 16) and int(facts["intermediate_serial"], 16)
    rotated = json.loads(runner.invoke(app, ["rotate", "--config", str(config), "--json"]).output)
    assert rotated["intermediate_serial"] != facts["intermediate_serial"]
    bundle = json.loads(runner.invoke(app, ["bundle", "--config", str(config), "--json"]).output)
    assert len(x509.load_pem_x509_certificates(bundle["bundle"].encode())) == 3
    (tmp_path / ".aegis").mkdir()
    (tmp_path / ".aegis" / "pepper").write_text(base64.b64encode(os.urandom(32)).decode())
    crl = tmp_path / "crl.pem"
    wrote = runner.invoke(
        app, ["crl", "--config", str(config), "--out", str(crl), "--pem", "--json"]
    )
    assert json.loads(wrote.output) == {"written": str(crl), "format": "pem"}
    assert len(crl.read_bytes().split(b"BEGIN X509 CRL")) == 3  # both trusted intermediates


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_agents_cert_is_the_same_command_and_fails_in_one_line(
    pki: Pki, control_plane_url: str, tmp_path: Path
) -> None:
    bundle = tmp_path / "trust.pem"
    bundle.write_bytes(pki.ca.bundle_pem())
    client_id, secret = pki.secrets["beta"]
    args = ["agents", "cert", "--client-id", client_id, "--out-dir", str(tmp_path / "beta"),
            "--bundle", str(bundle), "--json"]  # fmt: skip
    env = {"AEGIS_CLIENT_SECRET": secret}
    result = runner.invoke(aegis, [*args, "--url", control_plane_url], env=env)
    assert result.exit_code == 0, result.output
    facts = json.loads(result.output)
    assert facts["spiffe_id"] == "spiffe://example.org/tenant/t2/env/prod/agent/beta"
    assert facts["renew_at"] < facts["not_after"]
    assert pki.store.get(facts["serial"]) is not None
    down = runner.invoke(aegis, [*args, "--url", f"https://127.0.0.1:{_closed_port()}"], env=env)
    assert down.exit_code == 1
    assert down.stderr.startswith("error: ca_unavailable: ConnectError")
    assert down.stderr.count("\n") == 1
    junk = tmp_path / "junk.pem"
    junk.write_text("not a bundle")
    bad = runner.invoke(aegis, [*args[:-2], str(junk), "--url", control_plane_url], env=env)
    assert (bad.exit_code, bad.stderr.split(":")[:2]) == (1, ["error", " config_invalid"])
    # Over http:// the secret would travel in clear and the bundle come from anyone on the path.
    clear = control_plane_url.replace("https://", "http://")
    plain = runner.invoke(aegis, [*args, "--url", clear], env=env)
    assert (plain.exit_code, plain.stderr.split(":")[:2]) == (1, ["error", " invalid_request"])
    # The secret on the command line (readable in the process list) is refused, unsent.
    out = tmp_path / "argv"
    argv = [*args[:5], str(out), *args[6:], "--url", control_plane_url, "--client-secret", secret]
    on_argv = runner.invoke(aegis, argv, env={})
    assert (on_argv.exit_code, on_argv.stderr.split(":")[:2]) == (1, ["error", " invalid_request"])
    assert "command line" in on_argv.stderr and secret not in on_argv.output
    assert not out.exists()


def test_a_written_file_is_on_disk_before_it_replaces_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key renewed under --watch replaces the only working one: the new file is flushed to
    disk before the rename, and the rename after it, so a crash leaves one or the other whole."""
    from aegis.cli import certs

    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(
        os, "replace", lambda src, dst: (events.append("replace"), real_replace(src, dst))[1]
    )
    certs.write_file(tmp_path / "key.pem", b"-----BEGIN PRIVATE KEY-----\n", private=True)
    assert events == ["fsync", "replace", "fsync"]
    assert (tmp_path / "key.pem").read_bytes() == b"-----BEGIN PRIVATE KEY-----\n"


def test_operator_issue_revoke_and_bootstrap(config: Path, tmp_path: Path) -> None:
    (tmp_path / ".aegis").mkdir()
    (tmp_path / ".aegis" / "pepper").write_text(base64.b64encode(os.urandom(32)).decode())
    assert runner.invoke(app, ["init", "--config", str(config)]).exit_code == 0
    cfg = load_config(config, environ={})
    services = build_services(cfg)
    services.registry.register_agent(
        AgentSpec("payer", "acme", "prod", "owner@example.com"), actor="test"
    )
    base = ["--config", str(config), "--json"]
    out = tmp_path / "issued"
    made = runner.invoke(app, ["issue", "--agent", "payer", "--out-dir", str(out), *base])
    assert made.exit_code == 0, made.output
    facts = json.loads(made.output)
    assert (facts["spiffe_id"], facts["key_written"]) == (
        "spiffe://cli.example/tenant/acme/env/prod/agent/payer",
        True,
    )
    assert "certificate" not in facts and "BEGIN" not in made.output  # no PEM, no key on stdout
    assert (out / "key.pem").stat().st_mode & 0o077 == 0
    assert x509.load_pem_x509_certificate((out / "cert.pem").read_bytes()).serial_number == int(
        facts["serial"], 16
    )
    csr = tmp_path / "req.pem"
    csr.write_bytes(make_csr()[1])
    from_csr = runner.invoke(
        app, ["issue", "--agent", "payer", "--out-dir", str(tmp_path / "csr"), "--csr", str(csr), *base]
    )  # fmt: skip
    assert json.loads(from_csr.output)["key_written"] is False
    junk = tmp_path / "junk.pem"
    junk.write_text(
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
    )
    bad = runner.invoke(app, ["issue", "--agent", "payer", "--out-dir", str(tmp_path / "x"), "--csr", str(junk), *base])  # fmt: skip
    assert (bad.exit_code, bad.stderr.split(":")[1].strip()) == (1, "csr_invalid")
    ghost = runner.invoke(app, ["issue", "--agent", "ghost", "--out-dir", str(tmp_path / "g"), *base])  # fmt: skip
    assert ghost.exit_code == 1 and ghost.stderr.count("\n") == 1
    # As openssl x509 -serial prints it: upper case, an even number of digits.
    printed = facts["serial"].upper().zfill(len(facts["serial"]) + len(facts["serial"]) % 2 + 2)
    one = runner.invoke(app, ["revoke", "--serial", printed, *base])
    assert json.loads(one.output) == {"revoked": [facts["serial"]]}
    again = runner.invoke(app, ["revoke", "--serial", facts["serial"], *base])
    assert json.loads(again.output) == {"revoked": []}  # already revoked
    unknown = runner.invoke(app, ["revoke", "--serial", "0a:bc", *base])
    assert unknown.exit_code == 1 and "not_found" in unknown.stderr
    junk_serial = runner.invoke(app, ["revoke", "--serial", "xyz", *base])
    assert junk_serial.exit_code == 1 and "invalid_request" in junk_serial.stderr
    rest = json.loads(runner.invoke(app, ["revoke", "--agent", "payer", *base]).output)
    assert rest["revoked"] == [json.loads(from_csr.output)["serial"]]
    both = runner.invoke(app, ["revoke", "--serial", "1", "--agent", "payer", *base])
    assert both.stderr.startswith("error: invalid_request: give exactly one")
    token = json.loads(runner.invoke(app, ["bootstrap-token", "--agent", "payer", *base]).output)
    assert token["bootstrap_token"].startswith("aegis_bt_")
    asyncio.run(services.aclose())


def test_agents_cert_with_server_id_enrols_only_at_the_pinned_control_plane(
    pki: Pki, control_plane_url: str, tmp_path: Path
) -> None:
    def enrol(server_id: str) -> Result:
        return _enrol(pki, tmp_path, control_plane_url, "--server-id", server_id, "--json")

    before = len(pki.store.for_agent("beta"))
    # The fixture serves the "gw" agent's certificate: pinned to another identity, it is refused
    # at the handshake and the client credentials are never sent (nothing is issued).
    wrong = enrol("spiffe://example.org/tenant/t1/env/prod/agent/control-plane")
    assert wrong.exit_code == 1
    assert wrong.stderr.startswith("error: server_untrusted: ")
    assert "not the pinned" in wrong.stderr and wrong.stderr.count("\n") == 1
    assert len(pki.store.for_agent("beta")) == before
    bad = enrol("https://not-a-spiffe-id")
    assert (bad.exit_code, bad.stderr.split(":")[:2]) == (1, ["error", " spiffe_id_invalid"])
    good = enrol("spiffe://example.org/tenant/t1/env/prod/agent/gw")
    assert good.exit_code == 0, good.output
    assert json.loads(good.output)["spiffe_id"].endswith("/agent/beta")
    assert len(pki.store.for_agent("beta")) == before + 1


def test_revocations_name_a_known_agent_and_an_rfc_5280_reason(
    config: Path, tmp_path: Path
) -> None:
    """A mistyped ``--agent`` (revoking a compromised agent) is ``not_found``, not "revoked 0
    certificate(s)"; ``--reason`` is one of RFC 5280's, in either spelling, and reaches the CRL
    entry: ``keyCompromise`` was stored as free text and the CRL carried no reason code."""
    (tmp_path / ".aegis").mkdir()
    (tmp_path / ".aegis" / "pepper").write_text(base64.b64encode(os.urandom(32)).decode())
    assert runner.invoke(app, ["init", "--config", str(config)]).exit_code == 0
    services = build_services(load_config(config, environ={}))
    services.registry.register_agent(
        AgentSpec("payer", "acme", "prod", "owner@example.com"), actor="test"
    )
    base = ["--config", str(config), "--json"]
    typo = runner.invoke(app, ["revoke", "--agent", "payr", "--reason", "key_compromise", *base])
    assert typo.exit_code == 1 and typo.stderr.startswith("error: not_found"), typo.output
    bogus = runner.invoke(app, ["revoke", "--agent", "payer", "--reason", "stolen", *base])
    assert bogus.exit_code == 1 and "key_compromise" in bogus.stderr, bogus.output
    serials = {}
    for reason in ("keyCompromise", "superseded", "aACompromise", "unspecified"):
        made = runner.invoke(app, ["issue", "--agent", "payer", "--out-dir",
                                   str(tmp_path / reason), *base])  # fmt: skip
        serial = json.loads(made.output)["serial"]
        done = runner.invoke(app, ["revoke", "--serial", serial, "--reason", reason, *base])
        assert json.loads(done.output) == {"revoked": [serial]}, done.output
        serials[int(serial, 16)] = reason
    out = tmp_path / "crl.der"
    assert runner.invoke(app, ["crl", "--config", str(config), "--out", str(out)]).exit_code == 0
    crl = x509.load_der_x509_crl(out.read_bytes())
    found = {}
    for number, given in serials.items():
        entry = crl.get_revoked_certificate_by_serial_number(number)
        assert entry is not None
        codes = [e.value.reason for e in entry.extensions if isinstance(e.value, x509.CRLReason)]
        found[given] = codes
    assert found == {
        "keyCompromise": [x509.ReasonFlags.key_compromise],
        "superseded": [x509.ReasonFlags.superseded],
        "aACompromise": [x509.ReasonFlags.aa_compromise],
        "unspecified": [],  # RFC 5280 §5.3.1: no reason code rather than unspecified
    }
    asyncio.run(services.aclose())


@pytest.mark.parametrize(
    "args", [["revoke", "--serial", "1"], ["bootstrap-token", "--agent", "a"], ["bundle"]]
)
def test_ca_commands_without_a_configuration_refuse_and_create_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    """Run where there is no aegis.yaml, they created ``./.aegis/aegis.db`` (0644) there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AEGIS_CONFIG", raising=False)
    monkeypatch.delenv("AEGIS_DATABASE__URL", raising=False)
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: config_invalid: aegis.yaml does not exist")
    assert list(tmp_path.iterdir()) == []


def test_a_private_file_never_takes_the_mode_or_place_of_a_file_found_there(
    tmp_path: Path,
) -> None:
    """A stale (or planted) ``.key.pem.tmp`` of mode 0644 gave the key its mode, and a link there
    would have sent the key elsewhere: the temporary file is always a new one."""
    from aegis.cli.certs import write_file

    stale = tmp_path / ".key.pem.tmp"
    stale.write_text("")
    stale.chmod(0o644)
    elsewhere = tmp_path / "elsewhere"
    (tmp_path / ".cert.pem.tmp").symlink_to(elsewhere)
    write_file(tmp_path / "key.pem", b"secret", private=True)
    write_file(tmp_path / "cert.pem", b"public")
    assert (tmp_path / "key.pem").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "cert.pem").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "key.pem").read_bytes() == b"secret"
    assert not elsewhere.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".cert.pem.tmp", ".key.pem.tmp", "cert.pem", "key.pem"
    ]  # fmt: skip


def test_agents_cert_refuses_a_control_plane_whose_certificate_was_revoked(
    pki: Pki, control_plane_url: str, tmp_path: Path
) -> None:
    def enrol(*extra: str) -> Result:
        return _enrol(pki, tmp_path, control_plane_url, "--json", *extra)

    assert enrol().exit_code == 0
    before = len(pki.store.for_agent("beta"))
    # The serving certificate (the "gw" agent's) is revoked: refused in the handshake, before
    # the client secret is sent, so nothing is issued.
    assert pki.store.revoke_agent("gw", "keyCompromise")
    refused = enrol()
    assert refused.exit_code == 1
    assert refused.stderr.startswith("error: server_untrusted: ")
    assert "revoked" in refused.stderr and refused.stderr.count("\n") == 1
    assert len(pki.store.for_agent("beta")) == before
    # An operator may still choose to skip the check, as before.
    assert enrol("--no-check-revocation").exit_code == 0
    assert len(pki.store.for_agent("beta")) == before + 1


def test_agents_cert_refuses_revocation_lists_its_bundle_does_not_vouch_for(
    pki: Pki, tmp_path: Path
) -> None:
    """A control plane answering CRLs some other CA signed is refused as an untrusted server:
    its listing nothing proves nothing."""
    import datetime

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from starlette.responses import Response
    from starlette.routing import Route

    other = ec.generate_private_key(ec.SECP256R1())
    name = pki.ca.current.cert.subject  # the same name as the real intermediate, another key
    now = datetime.datetime.now(datetime.UTC)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(name)
        .last_update(now)
        .next_update(now + datetime.timedelta(minutes=5))
        .sign(other, hashes.SHA256())
    )
    pem = crl.public_bytes(serialization.Encoding.PEM)
    api = Starlette(routes=[Route("/pki/v1/crl.pem", lambda _: Response(pem), methods=["GET"])])
    with serving(pki, api) as url:
        refused = _enrol(pki, tmp_path, url)
    assert refused.exit_code == 1
    assert refused.stderr.startswith("error: server_untrusted: ")
    assert "do not verify" in refused.stderr and refused.stderr.count("\n") == 1
