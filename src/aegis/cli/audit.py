"""``aegis audit``: checkpoints, exports, offline verification, proofs, retention, shipping.

``verify`` and ``check-proof`` need no configuration and no database: only the export (or proof)
and the keys (``aegis jwks --evidence > keys.json``, or ``/.well-known/aegis-evidence-jwks.json``:
every key ever used, archived ones included, since a key past its retirement overlap leaves the
token JWKS but is still needed to check what it signed). The other commands work on the
configured database and key ring (docs/audit.md).
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from aegis.audit.checkpoint import Checkpointer, jwks_resolver
from aegis.audit.export import write_export
from aegis.audit.log import AuditLog
from aegis.audit.maintain import TICK, AuditMaintainer
from aegis.audit.proofs import check_proof, consistency_document, inclusion_document
from aegis.audit.retention import prune
from aegis.audit.runner import build_shippers
from aegis.audit.verify import verify_export
from aegis.cli._common import JsonOpt, emit, open_services
from aegis.crypto.jws import StrictJSONError, strict_json
from aegis.crypto.keys import PublicKey
from aegis.errors import EvidenceError

__all__ = ["app", "load_jwks"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)

app = typer.Typer(help="Tamper-evident audit log: verify, prove, export.", no_args_is_help=True)

JwksOpt = Annotated[
    list[Path],
    typer.Option("--jwks", help="JWK Set file (repeat for archived sets).", exists=True),
]
IssuerOpt = Annotated[
    str | None, typer.Option("--issuer", help="Require this issuer (default: any).")
]


def load_jwks(paths: list[Path]) -> Callable[[str], PublicKey | None]:
    """One resolver over every given JWK Set; a kid two files give different keys is refused."""
    keys: list[Any] = []
    for path in paths:
        try:
            doc = strict_json(path.read_text())
        except (OSError, ValueError) as exc:  # a repeated member included
            raise EvidenceError(f"{path}: not a readable JSON JWK Set") from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise EvidenceError(f"{path}: a JWK Set has a 'keys' array")
        keys.extend(doc["keys"])
    return jwks_resolver({"keys": keys})


@contextmanager
def _checkpointer(ctx: typer.Context) -> Iterator[Checkpointer]:
    with open_services(ctx) as services:
        log = AuditLog(services.config.database_url(), clock=services.clock)
        try:
            yield Checkpointer(
                log,
                services.keyring,
                issuer=services.config.evidence_issuer(),
                clock=services.clock,
            )
        finally:
            log.close()


@app.command()
def verify(
    export: Annotated[Path, typer.Argument(help="Export file (`aegis audit export`).")],
    jwks: JwksOpt,
    issuer: IssuerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Check a whole export offline: chain, Merkle tree, every checkpoint signature."""
    resolve = load_jwks(jwks)
    try:
        with export.open(encoding="utf-8") as f:
            summary = verify_export(f, resolve, issuer=issuer)
    except UnicodeDecodeError as exc:
        raise EvidenceError(f"{export}: not UTF-8 text", damage="malformed") from exc
    data = {
        "ok": True,
        "records": summary.records,
        "first_seq": summary.first_seq,
        "last_seq": summary.last_seq,
        "checkpoints": summary.checkpoints,
        "root_hash": summary.root_hash,
        "issuer": summary.issuer,
    }
    emit(
        data,
        as_json,
        lambda c: c.print(
            f"ok: {summary.records} records"
            + (f" ({summary.first_seq}-{summary.last_seq})" if summary.records else "")
            + f", {summary.checkpoints} signed checkpoints by {summary.issuer}, "
            f"root {summary.root_hash}"
        ),
    )


@app.command("check-proof")
def check_proof_cmd(
    proof: Annotated[Path, typer.Argument(help="Proof file (`aegis audit prove`).")],
    jwks: JwksOpt,
    issuer: IssuerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Check an inclusion or consistency proof offline against the JWKS."""
    try:
        doc = strict_json(proof.read_text())
    except StrictJSONError as exc:  # read alike by every checker, or not at all
        raise EvidenceError(f"{proof}: the proof {exc}", code="invalid_proof") from exc
    except (OSError, ValueError) as exc:
        raise EvidenceError(f"{proof}: not a JSON proof", code="invalid_proof") from exc
    checkpoints = check_proof(doc, load_jwks(jwks), issuer=issuer)
    sizes = [c.tree_size for c in checkpoints]
    emit(
        {"ok": True, "type": doc["type"], "tree_sizes": sizes},
        as_json,
        lambda c: c.print(f"ok: {doc['type']} verified against tree size(s) {sizes}"),
    )


@app.command()
def prove(
    ctx: typer.Context,
    record_id: Annotated[str, typer.Argument(help="Record seq or decision id.")],
    as_json: JsonOpt = False,
) -> None:
    """Print an inclusion proof (JSON) for one record, against a signed checkpoint."""
    with _checkpointer(ctx) as cp:
        doc = inclusion_document(cp, record_id)
    # JSON either way: the proof is the output. --json only makes it compact for scripts.
    typer.echo(json.dumps(doc, indent=None if as_json else 2))


@app.command()
def consistency(
    ctx: typer.Context,
    first: Annotated[int, typer.Argument(help="Tree size of the older checkpoint.")],
    second: Annotated[int, typer.Argument(help="Tree size of the newer checkpoint.")],
    as_json: JsonOpt = False,
) -> None:
    """Print a consistency proof (JSON) between two stored checkpoints."""
    with _checkpointer(ctx) as cp:
        doc = consistency_document(cp, first, second)
    typer.echo(json.dumps(doc, indent=None if as_json else 2))


@app.command()
def checkpoint(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Extend the Merkle tree and sign a checkpoint now."""
    with _checkpointer(ctx) as cp:
        c = cp.checkpoint()
    data = {"tree_size": c.tree_size, "root_hash": c.root_hash.hex(), "kid": c.kid}
    emit(data, as_json, lambda con: con.print(f"checkpoint at {c.tree_size}: {data['root_hash']}"))


@app.command()
def export(
    ctx: typer.Context,
    out: Annotated[Path, typer.Argument(help="File to write (JSON Lines).")],
    as_json: JsonOpt = False,
) -> None:
    """Write a verifiable export of every record the log holds."""
    with _checkpointer(ctx) as cp, out.open("w", encoding="utf-8") as f:
        count = write_export(cp, f, issuer=cp.issuer, now=time.time())
    emit({"records": count, "file": str(out)}, as_json, lambda c: c.print(f"{count} records"))


@app.command("prune")
def prune_cmd(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Delete records older than audit.retention_days, up to a signed checkpoint."""
    with open_services(ctx) as services:
        days = services.config.audit.retention_days
        if days <= 0:
            emit({"upto": 0, "deleted": 0}, as_json, lambda c: c.print("retention is off"))
            return
        log = AuditLog(services.config.database_url(), clock=services.clock)
        try:
            signer = Checkpointer(
                log,
                services.keyring,
                issuer=services.config.evidence_issuer(),
                clock=services.clock,
            )
            result = prune(
                log, before=services.clock.now() - days * 86400, verify=signer.verify_stored
            )
        finally:
            log.close()
    data = {"upto": result.upto, "deleted": result.deleted}
    emit(data, as_json, lambda c: c.print(f"pruned {result.deleted} records (to {result.upto})"))


@app.command()
def run(
    ctx: typer.Context,
    once: Annotated[bool, typer.Option("--once", help="One pass, then exit.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Checkpoint, ship to the configured sinks and apply retention, until SIGTERM or SIGINT."""
    stop = threading.Event()
    with open_services(ctx) as services:
        cfg, clock = services.config, services.clock
        log = AuditLog(cfg.database_url(), clock=clock)
        cp = Checkpointer(log, services.keyring, issuer=cfg.evidence_issuer(), clock=clock)
        maintainer = AuditMaintainer(
            cp, cfg.audit, clock=clock, shippers=build_shippers(log, cfg, clock=clock)
        )
        previous = {s: signal.signal(s, lambda *_: stop.set()) for s in _SIGNALS}
        try:
            while True:
                maintainer.step()
                if once or stop.wait(TICK):
                    break
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            maintainer.close()  # closes the log too
    cursors = {sh.sink.name: sh.cursor for sh in maintainer.shippers}
    emit({"cursors": cursors}, as_json, lambda c: c.print(f"stopped; exported up to {cursors}"))
