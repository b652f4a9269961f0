"""``aegis ca``: the internal certificate authority (RFC 5280) and agent certificates (X509-SVID).

Commands: ``init``, ``rotate``, ``issue``, ``bootstrap-token``, ``revoke``, ``bundle``, ``crl`` for
operators, and ``agent-cert`` for agents (enrol and keep renewing through ``/pki/v1/sign``).
Every command exits non-zero with a one-line reason (``error: <code>: <message>``) on failure, and
with ``--json`` prints one JSON document on stdout instead of prose (``agent-cert --watch``: one per
certificate). Nothing prints a private key or a secret except the bootstrap token, once, by design.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from aegis.cli._common import JsonOpt, existing_config
from aegis.cli.certs import agent_cert
from aegis.cli.certs import fail_cleanly as _fail_cleanly
from aegis.cli.certs import say as _say
from aegis.cli.certs import write_file as _write
from aegis.clock import SystemClock
from aegis.config import AegisConfig, load_config
from aegis.errors import AegisError
from aegis.pki.ca import CaFiles, CertificateAuthority
from aegis.pki.profile import parse_csr, revocation_reason
from aegis.pki.service import PkiService

if TYPE_CHECKING:
    from aegis.server.services import Services

__all__ = ["app"]

app = typer.Typer(
    help="Internal CA: init, rotate, issue and revoke agent certificates.", no_args_is_help=True
)
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="aegis.yaml (default: $AEGIS_CONFIG or ./aegis.yaml)"),
]


def _pki(config: AegisConfig) -> PkiService:
    return _services(config)[1]


def _services(config: AegisConfig) -> tuple[Services, PkiService]:
    from aegis.server.services import build_services

    services = build_services(config)
    pki = services.extras.get("pki")
    if not isinstance(pki, PkiService):
        raise AegisError("no ca yet; run `aegis ca init` first", code="config_invalid")
    return services, pki


@app.command()
def init(
    config: ConfigOpt = None,
    force: Annotated[
        bool, typer.Option(help="replace an existing CA (every agent must re-enrol)")
    ] = False,
    root_days: Annotated[int, typer.Option(min=1, help="root validity in days")] = 3650,
    intermediate_days: Annotated[
        int, typer.Option(min=1, help="intermediate validity in days")
    ] = 365,
    as_json: JsonOpt = False,
) -> None:
    """Create the root and the issuing intermediate (P-256 keys, encrypted under the KEK)."""
    with _fail_cleanly():
        cfg = load_config(existing_config(config))
        files = CaFiles.from_config(cfg)
        ca = CertificateAuthority.init(
            files,
            cfg.kek(),
            SystemClock(),
            cfg.pki.trust_domain,
            root_days=root_days,
            intermediate_days=intermediate_days,
            force=force,
        )
    _say(
        as_json,
        {
            "directory": str(files.directory),
            "trust_domain": ca.trust_domain,
            "root_serial": format(ca.root.serial_number, "x"),
            "intermediate_serial": format(ca.current.cert.serial_number, "x"),
            "root_key": str(files.root_key),
        },
        f"ca created in {files.directory} for trust domain {ca.trust_domain}",
        f"keep {files.root_key} offline: only `aegis ca rotate` needs it",
    )


@app.command()
def rotate(
    config: ConfigOpt = None,
    overlap: Annotated[
        int | None, typer.Option(help="seconds the old intermediate stays trusted")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Replace the issuing intermediate; the old one stays in the bundle for the overlap."""
    with _fail_cleanly():
        cfg = load_config(existing_config(config))
        ca = CertificateAuthority(
            CaFiles.from_config(cfg), cfg.kek(), SystemClock(), cfg.pki.trust_domain
        )
        window = (
            overlap if overlap is not None else cfg.pki.leaf_max_lifetime + cfg.pki.crl_lifetime
        )
        new = ca.rotate_intermediate(overlap=float(window))
    serial = format(new.cert.serial_number, "x")
    _say(
        as_json,
        {"intermediate_serial": serial, "overlap": window},
        f"new intermediate {serial}; old one trusted for {window} s",
    )


@app.command()
def issue(
    agent: Annotated[str, typer.Option(help="registered agent id")],
    out_dir: Annotated[Path, typer.Option(help="where to write cert.pem, chain.pem (and key.pem)")],
    csr: Annotated[
        Path | None, typer.Option(help="PEM CSR; omit to generate a P-256 key here")
    ] = None,
    lifetime: Annotated[int | None, typer.Option(min=1, help="seconds (capped)")] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Issue an agent certificate as an operator (identity from the registry)."""
    with _fail_cleanly():
        pki = _pki(load_config(existing_config(config)))
        key = None
        if csr is None:
            key = ec.generate_private_key(ec.SECP256R1())
            public: Any = key.public_key()
        else:
            public = parse_csr(csr.read_bytes())
        issued = pki.issue(agent, public, lifetime=lifetime)
    out_dir.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    _write(out_dir / "cert.pem", issued.certificate.public_bytes(pem))
    _write(out_dir / "chain.pem", b"".join(c.public_bytes(pem) for c in issued.chain))
    if key is not None:
        raw = key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        _write(out_dir / "key.pem", raw, private=True)
    facts = {k: v for k, v in issued.to_json().items() if k not in ("certificate", "chain")}
    _say(
        as_json,
        {**facts, "out_dir": str(out_dir), "key_written": key is not None},
        f"issued {issued.record.serial} for {issued.record.spiffe_id} "
        f"until {int(issued.record.not_after)}",
    )


@app.command("bootstrap-token")
def bootstrap_token(
    agent: Annotated[str, typer.Option(help="registered agent id")],
    ttl: Annotated[int | None, typer.Option(min=10, help="seconds the token stays usable")] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print a single-use enrolment token for an agent's first certificate (shown once)."""
    with _fail_cleanly():
        token = _pki(load_config(existing_config(config))).new_bootstrap_token(agent, lifetime=ttl)
    _say(as_json, {"agent": agent, "bootstrap_token": token}, token)


@app.command()
def revoke(
    serial: Annotated[str | None, typer.Option(help="hex serial of one certificate")] = None,
    agent: Annotated[
        str | None, typer.Option(help="revoke every live certificate of this agent")
    ] = None,
    reason: Annotated[
        str, typer.Option(help="RFC 5280 reason: key_compromise, superseded, ... (keyCompromise)")
    ] = "unspecified",
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Revoke one certificate or all of an agent's; the next CRL lists them."""
    with _fail_cleanly():
        if (serial is None) == (agent is None):
            raise AegisError("give exactly one of --serial or --agent", code="invalid_request")
        reason = revocation_reason(reason)
        services, pki = _services(load_config(existing_config(config)))
        store = pki.store
        done: list[str] = []
        if serial is not None:
            # As openssl prints it (01:AB, 0x..., a leading 0) or as Aegis does: one number.
            wanted = serial.strip().lower().removeprefix("0x").replace(":", "")
            try:
                key = format(int(wanted, 16), "x")
            except ValueError:
                raise AegisError(
                    f"--serial {serial[:64]!r} is not a hexadecimal serial number",
                    code="invalid_request",
                ) from None
            if store.get(key) is None:
                raise AegisError(f"no certificate with serial {key} was issued here",
                                 code="not_found")  # fmt: skip
            done = [key] if store.revoke_serial(key, reason) else []
        if agent:
            # A mistyped id (revoking a compromised agent) is not "revoked 0 certificates".
            services.registry_store.get_agent(agent)  # not_found for an agent never registered
            done = store.revoke_agent(agent, reason)
    _say(as_json, {"revoked": done}, f"revoked {len(done)} certificate(s)")


@app.command()
def bundle(
    config: ConfigOpt = None,
    out: Annotated[Path | None, typer.Option(help="write the PEM here instead of stdout")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Print (or write) the trust bundle: root and every trusted intermediate."""
    with _fail_cleanly():
        cfg = load_config(existing_config(config))
        pem = CertificateAuthority(
            CaFiles.from_config(cfg), cfg.kek(), SystemClock(), cfg.pki.trust_domain
        ).bundle_pem()
    if out is not None:
        _write(out, pem)
        _say(as_json, {"written": str(out)})
    elif as_json:
        _say(True, {"bundle": pem.decode()})
    else:
        typer.echo(pem.decode(), nl=False)


@app.command()
def crl(
    out: Annotated[Path, typer.Option(help="file to write")],
    pem: Annotated[bool, typer.Option(help="PEM, every trusted intermediate's CRL")] = False,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write a fresh CRL (DER, or PEM for every trusted intermediate with --pem)."""
    with _fail_cleanly():
        pki = _pki(load_config(existing_config(config)))
        _write(out, pki.crl_pem() if pem else pki.crl_der())
    _say(as_json, {"written": str(out), "format": "pem" if pem else "der"}, f"wrote {out}")


# Agents enrol themselves with the same command (also `aegis agents cert`).
app.command("agent-cert")(agent_cert)
