"""How lenient upstream frameworks file a parameter or field name: policy reads every key a
call's names may stand for (PHP, Rack, qs, ASP.NET Core, Spring, CGI and WSGI servers)."""

from __future__ import annotations

import re
from typing import Final

from aegis.crypto.jws import fold_name

__all__ = [
    "header_key",
    "name_keys",
    "query_key",
]


def query_key(name: str) -> str:
    """The parameter a lenient server files ``name`` under: case-insensitively (ASP.NET Core,
    with :func:`~aegis.crypto.jws.fold_name`'s folding), without a ``[...]`` suffix (PHP and
    Node's qs read ``action[]`` as ``action``), and as PHP registers it: cut at a NUL, without
    leading spaces, with ``.`` and spaces as ``_``."""
    name = name.split("\x00", 1)[0].lstrip(" ")
    return fold_name(name.split("[", 1)[0].replace(".", "_").replace(" ", "_"))


def name_keys(name: str) -> frozenset[str]:
    """Every :func:`query_key` a lenient parser may file ``name`` under: as it is; without
    leading brackets and cut at the first bracket (Rack 2 and qs read ``[_method]`` as
    ``_method``); with an unclosed ``[`` as ``_`` (PHP reads ``account[id`` as ``account_id``);
    after its last ``.`` (ASP.NET Core binds ``t.amount`` to the ``amount`` of an action's
    parameter ``t``, ahead of a plain ``amount``); as the name in its last ``[...]`` (ASP.NET
    Core's jQuery form and query value providers read ``t[amount]`` as ``t.amount``); and each of
    these without a leading ``!`` (Spring's WebDataBinder binds ``!amount`` as ``amount`` when no
    ``amount`` is sent)."""
    base = name.split("\x00", 1)[0].lstrip(" ")
    keys = _keys(base)
    if base.startswith("!"):
        keys |= _keys(base[1:])
    return frozenset(keys)


def _keys(base: str) -> set[str]:
    keys = {query_key(base), query_key(_BRACKETS.split(base.lstrip("[]"), 1)[0])}
    if "." in base and (last := base.rsplit(".", 1)[1]):
        keys.add(query_key(last))
    if inner := [n for n in _BRACKETED.findall(base) if n]:
        keys.add(query_key(inner[-1]))
    opened = base.find("[")
    if opened >= 0 and "]" not in base[opened:]:
        # PHP turns that [ into _ and every later [ as well (transfer[max[amount is
        # transfer_max_amount).
        keys.add(query_key(base[:opened] + "_" + base[opened + 1 :].replace("[", "_")))
    return keys


_BRACKETS: Final = re.compile(r"[\[\]]")
_BRACKETED: Final = re.compile(r"\[([^\[\]]*)\]")


def header_key(name: str) -> str:
    """The field a CGI or WSGI server files ``name`` under (``X_Account`` is ``x-account``)."""
    return name.lower().replace("_", "-")
