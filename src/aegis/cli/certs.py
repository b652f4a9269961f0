"""Agent certificates from the command line: ``aegis agents cert`` (also ``aegis ca agent-cert``).

An agent enrols through ``POST /pki/v1/sign`` with its client credentials, writes ``cert.pem`` (leaf
and chain), ``key.pem`` (0600) and ``bundle.pem``, and with ``--watch`` keeps running and renews at
two thirds of each certificate's lifetime (:class:`aegis.pki.renewal.CertificateManager`; each
file is replaced atomically, ``key.pem`` first, ``cert.pem`` last). Also the helpers the
``aegis ca`` commands share: one-line failures with the stable code, ``--json`` output, private
files created 0600.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from cryptography.hazmat.primitives import serialization

from aegis.cli._common import JsonOpt
from aegis.clock import SystemClock
from aegis.errors import AegisError
from aegis.pki.renewal import CertificateManager, Credential, basic_credentials
from aegis.sdk.revocation import InvalidCrl, ServerRevocations, guard_server

__all__ = ["agent_cert", "fail_cleanly", "say", "write_file"]


@contextmanager
def fail_cleanly() -> Iterator[None]:
    try:
        yield
    except AegisError as exc:
        typer.echo(f"error: {exc.code}: {' '.join(exc.message.split())}", err=True)
        raise typer.Exit(1) from None
    except (httpx.HTTPError, OSError) as exc:  # the control plane is unreachable or says nonsense
        if _refused_server(exc):
            reason = " ".join(str(exc).split())[:200]
            typer.echo(f"error: server_untrusted: {reason}", err=True)
            raise typer.Exit(1) from None
        typer.echo(f"error: ca_unavailable: {type(exc).__name__}: {str(exc)[:200]}", err=True)
        raise typer.Exit(1) from None


def _refused_server(exc: BaseException) -> bool:
    """Whether the TLS handshake refused the server (the chain, or a pinned SPIFFE ID)."""
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen:
        if isinstance(cur, ssl.SSLCertVerificationError):
            return True
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return False


def say(as_json: bool, data: dict[str, Any], *lines: str) -> None:
    """One JSON document, or the human lines."""
    if as_json:
        typer.echo(json.dumps(data, indent=2))
    else:
        for line in lines:
            typer.echo(line)


def write_file(path: Path, data: bytes, *, private: bool = False) -> None:
    """Write atomically; private files are created 0600 before any byte is written. The
    temporary file is a new one (``mkstemp``: ``O_EXCL``, mode 0600), never one found in place:
    a stale or planted ``.key.pem.tmp`` of mode 0644, or a link to elsewhere, would otherwise
    give the key its mode or its place."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if not private:
            os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            # On disk before it takes the old file's place: a crash after the rename must not
            # leave an empty or torn key.pem where a working one was.
            f.flush()
            os.fsync(f.fileno())
        os.replace(name, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself
        finally:
            os.close(directory)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
        raise


def agent_cert(
    ctx: typer.Context,
    url: Annotated[str, typer.Option(help="control plane base URL, e.g. https://aegis:8443")],
    client_id: Annotated[str, typer.Option(envvar="AEGIS_CLIENT_ID", help="the agent's client")],
    out_dir: Annotated[Path, typer.Option(help="cert.pem (leaf and chain), key.pem, bundle.pem")],
    bundle_file: Annotated[
        Path, typer.Option("--bundle", help="trust bundle to verify the control plane")
    ],
    client_secret: Annotated[
        str,
        typer.Option(
            envvar="AEGIS_CLIENT_SECRET",
            prompt=True,
            hide_input=True,
            help="$AEGIS_CLIENT_SECRET or the prompt; refused on the command line, which other "
            "users can read",
        ),
    ],
    server_id: Annotated[
        str | None,
        typer.Option(
            help="the control plane's SPIFFE ID: refuse any other server before sending credentials"
        ),
    ] = None,
    lifetime: Annotated[int | None, typer.Option(min=5, help="seconds (capped by the CA)")] = None,
    watch: Annotated[
        bool, typer.Option(help="keep running and renew at 2/3 of the lifetime")
    ] = False,
    check_revocation: Annotated[
        bool,
        typer.Option(
            help="refuse a control plane whose certificate the CA revoked (its CRLs, read first)"
        ),
    ] = True,
    as_json: JsonOpt = False,
) -> None:
    """Enrol this agent (and with --watch keep its certificate renewed) through /pki/v1/sign."""
    with fail_cleanly():
        source = ctx.get_parameter_source("client_secret")
        if source is not None and source.name == "COMMANDLINE":
            raise AegisError(
                "the client secret is never taken on the command line (other users read it in "
                "the process list): set $AEGIS_CLIENT_SECRET or answer the prompt",
                code="invalid_request",
            )
        if not url.lower().startswith("https://"):
            # The client secret would travel in clear, and the bundle answered, which the agent
            # trusts from then on, would come from whoever is on the path.
            raise AegisError(
                f"--url must be https:// (got {url[:64]!r}): enrolment sends the client secret "
                "and receives the trust bundle",
                code="invalid_request",
            )
        trust = bundle_file.read_bytes()
        try:
            verify = ssl.create_default_context(cadata=trust.decode())
        except (ssl.SSLError, ValueError):
            raise AegisError(
                f"{bundle_file} is not a PEM trust bundle", code="config_invalid"
            ) from None
        # Aegis certificates name SPIFFE IDs, not hosts: without --server-id any certificate the
        # bundle's CA issued with serverAuth is taken for the control plane (docs/pki.md).
        verify.check_hostname = False
        revocations = None
        if check_revocation:
            # The CA's CRLs, signed (so read over a connection that cannot itself consult them):
            # a control plane whose certificate was revoked is refused in the handshake, before
            # the client secret is sent. Fails closed while no current CRL is held.
            revocations = ServerRevocations(url, trust, server_id=server_id)
            try:
                revocations.refresh()
            except InvalidCrl as exc:  # reported as a refused server (server_untrusted)
                raise ssl.SSLCertVerificationError(
                    f"the CA's revocation lists from {url} do not verify: {exc}"
                ) from None
        servers = (server_id,) if server_id is not None else ()
        verify = guard_server(verify, servers, revocations)
        if revocations is not None and watch:
            revocations.start()  # kept current for every renewal's handshake
        out_dir.mkdir(parents=True, exist_ok=True)

    def save(cred: Credential) -> None:
        key = cred.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_file(out_dir / "key.pem", key, private=True)
        write_file(out_dir / "cert.pem", cred.chain_pem())
        write_file(out_dir / "bundle.pem", cred.trust_pem)
        facts = {"serial": cred.serial, "spiffe_id": cred.spiffe_id, "x5t#S256": cred.x5t_s256,
                 "not_after": int(cred.not_after), "renew_at": int(cred.renew_at)}  # fmt: skip
        text = f"certificate {cred.serial} for {cred.spiffe_id} until {int(cred.not_after)}"
        if as_json:
            typer.echo(json.dumps(facts))  # one line per certificate, also under --watch
        else:
            typer.echo(text)

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
    with fail_cleanly():
        asyncio.run(run())


def _forever(manager: CertificateManager) -> Callable[[], Any]:
    async def loop() -> None:
        await manager.start()
        await asyncio.Event().wait()

    return loop
