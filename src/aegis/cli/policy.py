"""``aegis policy``: validate, build, evaluate, test, store, activate and report on policies.

Commands are built for CI: each prints a human summary or, with ``--json``, one JSON document, and
exits non-zero with a one-line reason on failure (1: the policy or its tests failed, 2: bad usage
or unreadable input).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from aegis.cli import policy_versions
from aegis.clock import SystemClock
from aegis.errors import AegisError
from aegis.policy.dryrun import dry_run
from aegis.policy.evaluator import compile_policy
from aegis.policy.loader import load_document
from aegis.policy.model import PolicyDocument
from aegis.policy.rego import build_bundle, bundle_files
from aegis.policy.shadow import shadow_report
from aegis.policy.testing import run_path
from aegis.policy.version import short_version

__all__ = ["app"]

app = typer.Typer(
    help="Policies as code: validate, build OPA bundles, evaluate calls, run policy tests, "
    "store and activate versions.",
    no_args_is_help=True,
)
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON document")]


def _emit(data: Any, as_json: bool, text: str) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True) if as_json else text)


@contextmanager
def _failures(as_json: bool) -> Iterator[None]:
    try:
        yield
    except AegisError as exc:
        if as_json:
            typer.echo(json.dumps({"error": exc.to_dict()}, sort_keys=True))
        else:
            typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(1) from exc
    except (OSError, ValueError) as exc:
        message = f"cannot read input: {exc}"
        if as_json:
            typer.echo(json.dumps({"error": {"code": "invalid_request", "message": message}}))
        else:
            typer.echo(f"error: {message}", err=True)
        raise typer.Exit(2) from exc


def _read_policy(file: Path) -> PolicyDocument:
    """The policy in ``file``; one that cannot be read is unreadable input (exit 2), not an
    invalid policy (exit 1)."""
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise OSError(
            f"{file}: cannot read the policy file ({exc.strerror or exc}); check the path"
        ) from exc
    return load_document(data, str(file))


@app.command()
def validate(
    file: Annotated[Path, typer.Argument(help="policy file (YAML or JSON)")],
    as_json: JsonOpt = False,
) -> None:
    """Check a policy against the aegis/v1 schema and report file:line on error."""
    with _failures(as_json):
        policy = compile_policy(_read_policy(file))
        doc = policy.document
        info = {
            "file": str(file),
            "name": doc.metadata.name,
            "version": policy.version,
            "rules": len(doc.spec.rules),
            "mode": doc.spec.mode,
        }
        text = f"ok: {file}: policy {doc.metadata.name} {short_version(policy.version)} ({info['rules']} rules)"
        if doc.spec.mode == "shadow":
            text += "\nwarning: mode is shadow: every call is allowed and only recorded"
        _emit(info, as_json, text)


@app.command()
def build(
    file: Annotated[Path, typer.Argument(help="policy file (YAML or JSON)")],
    out: Annotated[Path, typer.Option("--out", help="directory for the OPA bundle files")],
    as_json: JsonOpt = False,
) -> None:
    """Write an OPA bundle: .manifest, policy.rego (Rego v1), data.json and bundle.tar.gz."""
    with _failures(as_json):
        policy = compile_policy(_read_policy(file))
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for name, data in bundle_files(policy).items():
            (out / name).write_bytes(data)
            written.append(str(out / name))
        (out / "bundle.tar.gz").write_bytes(build_bundle(policy))
        written.append(str(out / "bundle.tar.gz"))
        info = {"version": policy.version, "files": sorted(written)}
        _emit(info, as_json, f"built {short_version(policy.version)} into {out}")


@app.command("eval")
def eval_(
    policy: Annotated[Path, typer.Option("--policy", help="policy file")],
    input_: Annotated[Path, typer.Option("--input", help="call JSON (see docs/policy.md)")],
    as_json: JsonOpt = False,
) -> None:
    """Dry-run one call: print the decision and why each rule matched or not."""
    with _failures(as_json):
        compiled = compile_policy(_read_policy(policy))
        call = json.loads(input_.read_text())
        if not isinstance(call, dict):
            raise ValueError("the input must be a JSON object")
        result = dry_run(compiled, call)
        d = result["decision"]
        lines = [
            f"decision: {d['action']} (policy {short_version(result['policy_version'])})",
            *(f"  reason: {r}" for r in d["reasons"]),
        ]
        if d["shadow"]:
            lines.append(f"shadow: {d['shadow']['action']} {', '.join(d['shadow']['rule_ids'])}")
        for rule in result["trace"]:
            mark = "match" if rule["matched"] else ("error" if rule["errors"] else "-")
            lines.append(f"  [{mark:5}] {rule['id']} ({rule['action']}): {rule['why']}")
        _emit(result, as_json, "\n".join(lines))


@app.command("test")
def run_tests(
    path: Annotated[Path, typer.Argument(help="a *_test.yaml file or a directory of them")],
    as_json: JsonOpt = False,
) -> None:
    """Run policy test cases (note, input, want) and fail if any case fails."""
    with _failures(as_json):
        results = run_path(path)
        failed = [r for r in results if not r.passed]
        if as_json:
            typer.echo(
                json.dumps(
                    {
                        "passed": len(results) - len(failed),
                        "failed": len(failed),
                        "failures": [
                            {
                                "file": r.file,
                                "note": r.note,
                                "want": r.want,
                                "got": r.got,
                                "error": r.error,
                            }
                            for r in failed
                        ],
                    },
                    indent=2,
                    sort_keys=True,
                )
            )
        else:
            for r in results:
                typer.echo(f"{'PASS' if r.passed else 'FAIL'}: {r.file}: {r.note}")
                if r.error:
                    typer.echo(f"  {r.error}")
                if r.diff:
                    typer.echo("\n".join(f"  {line}" for line in r.diff.splitlines()))
            typer.echo(f"{len(results) - len(failed)} passed, {len(failed)} failed")
        if failed:
            if not as_json:
                typer.echo(f"error: {len(failed)} policy test case(s) failed", err=True)
            raise typer.Exit(1)


_DURATION = re.compile(r"^(\d+)([smhd])$")


def _seconds(text: str) -> float:
    m = _DURATION.match(text)
    if m is None:
        raise ValueError(f"duration {text!r} must look like 90s, 15m, 24h or 7d")
    return int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


@app.command("shadow-report")
def shadow_report_(
    log: Annotated[Path, typer.Option("--log", help="decision log, JSON Lines")],
    last: Annotated[
        str | None, typer.Option("--last", help="window ending now: 15m, 24h, 7d")
    ] = None,
    since: Annotated[
        float | None, typer.Option("--since", help="window start, unix seconds")
    ] = None,
    until: Annotated[float | None, typer.Option("--until", help="window end, unix seconds")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Summarise would-deny shadow decisions by rule, agent and tool."""
    with _failures(as_json):
        if last is not None:
            until = SystemClock().now()
            since = until - _seconds(last)
        with log.open(encoding="utf-8") as fh:
            report = shadow_report(fh, since=since, until=until)
        lines = [f"{report['would_deny']} would-deny of {report['decisions']} decisions"]
        for key in ("by_rule", "by_agent", "by_tool"):
            lines.append(f"{key.removeprefix('by_')}:")
            lines.extend(f"  {n:6d}  {name}" for name, n in report[key].items())
        _emit(report, as_json, "\n".join(lines))


# Versions in the configured database (store, activate, list): aegis.cli.policy_versions.
app.command("store")(policy_versions.store)
app.command("activate")(policy_versions.activate)
app.command("versions")(policy_versions.versions)
