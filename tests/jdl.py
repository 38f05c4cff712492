"""The tests' one JDL builder, importable from every test package (no scheduler imports)."""

from __future__ import annotations

from typing import Any


def jdl_text(*, brackets: bool = True, **attrs: Any) -> str:
    """A JDL of ``attrs`` in the order given, on one line; ``Executable`` defaults to ``/bin/true``.

    Raw text on purpose, unlike ``galaxy_dirac.jdl.render`` (which sorts and validates): tests keep their attribute
    order and send values a server must refuse. ``brackets=False`` gives the bare ``A = "x"; B = 1;`` form that
    DiracX clients send.
    """
    attrs.setdefault("Executable", "/bin/true")
    parts = []
    for name, value in attrs.items():
        if isinstance(value, (list, tuple)):
            parts.append(f"{name} = {{{', '.join(repr(str(v)).replace(chr(39), chr(34)) for v in value)}}};")
        elif isinstance(value, str):
            parts.append(f'{name} = "{value}";')
        else:
            parts.append(f"{name} = {value};")
    body = " ".join(parts)
    return f"[ {body} ]" if brackets else body
