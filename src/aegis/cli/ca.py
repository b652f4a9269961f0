"""``aegis ca``: the internal certificate authority (RFC 5280) and agent certificates (X509-SVID).

Commands: ``init``, ``rotate``, ``issue``, ``bootstrap-token``, ``revoke``, ``bundle``, ``crl`` for
operators, and ``agent-cert`` for agents (enrol and keep renewing through ``/pki/v1/sign``).
Every command exits non-zero with a one-line reason on failure; nothing prints a private key or a
secret except the bootstrap token, once, by design.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from aegis.clock import SystemClock
from aegis.config import AegisConfig, load_config
from aegis.errors import AegisError
from aegis.pki.ca import CaFiles, CertificateAuthority
from aegis.pki.profile import parse_csr
from aegis.pki.renewal import CertificateManager, Credential, basic_credentials
from aegis.pki.service import PkiService

__all__ = ["app"]

app = typer.Typer(
    help="Internal CA: init, rotate, issue and revoke agent certificates.", no_args_is_help=True
)
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="aegis.yaml (default: $AEGIS_CONFIG or ./aegis.yaml)"),
]


@contextmanager
def _fail_cleanly() -> Iterator[None]:
    try:
        yield
    except AegisError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(1) from None


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    """Write atomically; private files are created 0600 before any byte is written."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.replace(path)


def _pki(config: AegisConfig) -> PkiService:
    from aegis.server.services import build_services

    pki = build_services(config).extras.get("pki")
    if not isinstance(pki, PkiService):
        raise AegisError("no ca yet; run `aegis ca init` first", code="config_invalid")
    return pki


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
) -> None:
    """Create the root and the issuing intermediate (P-256 keys, encrypted under the KEK)."""
    with _fail_cleanly():
        cfg = load_config(config)
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
    typer.echo(f"ca created in {files.directory} for trust domain {ca.trust_domain}")
    typer.echo(f"keep {files.root_key} offline: only `aegis ca rotate` needs it")


@app.command()
def rotate(
    config: ConfigOpt = None,
    overlap: Annotated[
        int | None, typer.Option(help="seconds the old intermediate stays trusted")
    ] = None,
) -> None:
    """Replace the issuing intermediate; the old one stays in the bundle for the overlap."""
    with _fail_cleanly():
        cfg = load_config(config)
        ca = CertificateAuthority(
            CaFiles.from_config(cfg), cfg.kek(), SystemClock(), cfg.pki.trust_domain
        )
        window = (
            overlap if overlap is not None else cfg.pki.leaf_max_lifetime + cfg.pki.crl_lifetime
        )
        new = ca.rotate_intermediate(overlap=float(window))
    typer.echo(
        f"new intermediate {format(new.cert.serial_number, 'x')}; old one trusted for {window} s"
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
) -> None:
    """Issue an agent certificate as an operator (identity from the registry)."""
    with _fail_cleanly():
        pki = _pki(load_config(config))
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
    typer.echo(
        f"issued {issued.record.serial} for {issued.record.spiffe_id} until {int(issued.record.not_after)}"
    )


@app.command("bootstrap-token")
def bootstrap_token(
    agent: Annotated[str, typer.Option(help="registered agent id")],
    ttl: Annotated[int | None, typer.Option(min=10, help="seconds the token stays usable")] = None,
    config: ConfigOpt = None,
) -> None:
    """Print a single-use enrolment token for an agent's first certificate (shown once)."""
    with _fail_cleanly():
        token = _pki(load_config(config)).new_bootstrap_token(agent, lifetime=ttl)
    typer.echo(token)


@app.command()
def revoke(
    serial: Annotated[str | None, typer.Option(help="hex serial of one certificate")] = None,
    agent: Annotated[
        str | None, typer.Option(help="revoke every live certificate of this agent")
    ] = None,
    reason: Annotated[str, typer.Option(help="key_compromise, superseded, ...")] = "unspecified",
    config: ConfigOpt = None,
) -> None:
    """Revoke one certificate or all of an agent's; the next CRL lists them."""
    with _fail_cleanly():
        if (serial is None) == (agent is None):
            raise AegisError("give exactly one of --serial or --agent", code="invalid_request")
        store = _pki(load_config(config)).store
        done = [serial] if serial and store.revoke_serial(serial.lower(), reason) else []
        if agent:
            done = store.revoke_agent(agent, reason)
    typer.echo(f"revoked {len(done)} certificate(s)")


@app.command()
def bundle(config: ConfigOpt = None, out: Annotated[Path | None, typer.Option()] = None) -> None:
    """Print (or write) the trust bundle: root and every trusted intermediate."""
    with _fail_cleanly():
        cfg = load_config(config)
        pem = CertificateAuthority(
            CaFiles.from_config(cfg), cfg.kek(), SystemClock(), cfg.pki.trust_domain
        ).bundle_pem()
    if out is None:
        typer.echo(pem.decode(), nl=False)
    else:
        _write(out, pem)


@app.command()
def crl(out: Annotated[Path, typer.Option()], pem: bool = False, config: ConfigOpt = None) -> None:
    """Write a fresh CRL (DER, or PEM for every trusted intermediate with --pem)."""
    with _fail_cleanly():
        pki = _pki(load_config(config))
        _write(out, pki.crl_pem() if pem else pki.crl_der())
    typer.echo(f"wrote {out}")


@app.command("agent-cert")
def agent_cert(
    url: Annotated[str, typer.Option(help="control plane base URL, e.g. https://aegis:8443")],
    client_id: Annotated[str, typer.Option(envvar="AEGIS_CLIENT_ID")],
    out_dir: Annotated[Path, typer.Option(help="cert.pem (leaf and chain), key.pem, bundle.pem")],
    bundle_file: Annotated[
        Path, typer.Option("--bundle", help="trust bundle to verify the control plane")
    ],
    client_secret: Annotated[
        str, typer.Option(envvar="AEGIS_CLIENT_SECRET", prompt=True, hide_input=True)
    ],
    lifetime: Annotated[int | None, typer.Option(min=5)] = None,
    watch: Annotated[
        bool, typer.Option(help="keep running and renew at 2/3 of the lifetime")
    ] = False,
) -> None:
    """Enrol this agent (and with --watch keep its certificate renewed) through /pki/v1/sign."""
    trust = bundle_file.read_bytes()
    verify = ssl.create_default_context(cadata=trust.decode())
    verify.check_hostname = (
        False  # Aegis certificates name SPIFFE IDs; the chain is what is checked
    )
    out_dir.mkdir(parents=True, exist_ok=True)

    def save(cred: Credential) -> None:
        key = cred.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write(out_dir / "key.pem", key, private=True)
        _write(out_dir / "cert.pem", cred.chain_pem())
        _write(out_dir / "bundle.pem", cred.trust_pem)
        typer.echo(f"certificate {cred.serial} for {cred.spiffe_id} until {int(cred.not_after)}")

    manager = CertificateManager(
        url,
        basic_credentials(client_id, client_secret),
        clock=SystemClock(),
        trust_pem=trust,
        verify=verify,
        lifetime=lifetime,
        on_renew=[save],
    )
    run: Callable[[], Any] = manager.obtain if not watch else _forever(manager)
    with _fail_cleanly():
        asyncio.run(run())


def _forever(manager: CertificateManager) -> Callable[[], Any]:
    async def loop() -> None:
        await manager.start()
        await asyncio.Event().wait()

    return loop
