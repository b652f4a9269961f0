"""``aegis keys`` and ``aegis jwks``: the token-signing key ring (docs/operations.md).

Keys move ``next -> active -> retired``; a next key is published for ``keys.publish_lead``
seconds before it may sign, so ``rotate`` refuses an early rotation unless ``--force`` (tokens
signed by the new key may then be refused by verifiers that have not fetched it yet). Only kids,
states and dates are shown; private keys never leave the key store.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from aegis.cli._common import JsonOpt, actor, emit, open_services, table
from aegis.server.admin_ops import key_view, rotate_keys

__all__ = ["app", "jwks"]

app = typer.Typer(help="List and rotate the token-signing keys.", no_args_is_help=True)


@app.command("list")
def list_keys(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List signing keys: kid, state and dates."""
    with open_services(ctx) as services:
        views = [key_view(r) for r in services.keyring.records()]
    rows = [[v["kid"], v["state"], v["alg"], v["created_at"], v["remove_after"]] for v in views]
    emit(
        {"items": views},
        as_json,
        lambda c: c.print(table(["kid", "state", "alg", "created_at", "remove_after"], rows)),
    )


@app.command()
def rotate(
    ctx: typer.Context,
    force: Annotated[
        bool, typer.Option("--force", help="Rotate even if the next key is freshly published.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Promote the next key, retire the active one, publish a new next key."""
    with open_services(ctx) as services:
        result = rotate_keys(services, force=force, actor=actor())
    emit(result, as_json, lambda c: c.print(f"active signing key is now {result['active']}"))


def jwks(
    ctx: typer.Context,
    evidence: Annotated[
        bool,
        typer.Option(
            "--evidence",
            help="Every key ever used, archived ones too: for `aegis audit verify` and "
            "`check-proof` on old records (never for checking tokens).",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Print the public JWK Set (what /.well-known/jwks.json serves)."""
    with open_services(ctx) as services:
        ring = services.keyring
        document = ring.evidence_jwks() if evidence else ring.jwks()
    # JSON either way: the set is the output. --json only makes it compact for scripts.
    typer.echo(json.dumps(document, indent=None if as_json else 2))
