"""libyaml and the pure-Python parser read every policy the same way (value and line map), so the
faster one can be used whenever PyYAML was built with it. (One known difference: libyaml accepts
a tab as separation space, as YAML allows, where the Python scanner refuses it.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from aegis.errors import PolicyError
from aegis.policy import yamlsource
from tests.policy.conftest import CORPUS, REPO

FILES = [*CORPUS, *sorted((REPO / "examples" / "policies").glob("*.yaml"))]
BAD = [
    "a: 1\na: 2\n",
    "a: &x [1]\nb: *x\n",
    "a: [1, 2\n",
    "? [a]\n: 1\n",
    "a: !!python/object:os.system x\n",
    "- a\n- b\n---\n- c\n",
]


def _both(monkeypatch: pytest.MonkeyPatch, text: str) -> list[object]:
    out: list[object] = []
    for loader in (yaml.SafeLoader, yaml.CSafeLoader):
        monkeypatch.setattr(yamlsource, "_LOADER", loader)
        try:
            doc = yamlsource.parse_source(text, "p.yaml")
            out.append((doc.value, doc.lines))
        except PolicyError as exc:
            out.append(("error", exc.code, exc.details.get("line")))
    return out


def test_libyaml_is_used_when_available() -> None:
    assert yaml.__with_libyaml__
    assert yamlsource._LOADER is yaml.CSafeLoader


@pytest.mark.parametrize("path", FILES, ids=lambda p: Path(p).name)
def test_both_parsers_agree_on_every_policy_file(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    python, libyaml = _both(monkeypatch, path.read_text())
    assert python == libyaml
    assert not (isinstance(python, tuple) and python[0] == "error")


@pytest.mark.parametrize("text", BAD)
def test_both_parsers_refuse_the_same_documents(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    python, libyaml = _both(monkeypatch, text)
    assert isinstance(python, tuple) and python[0] == "error"
    assert python == libyaml
