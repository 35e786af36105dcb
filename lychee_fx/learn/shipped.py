"""Role maps shipped with the package (``lychee_fx/data/<name>.roles.json``), learned with
``python -m lychee_fx learn-roles``; each file's ``meta`` holds the command that made it."""

from __future__ import annotations

import importlib.resources

from lychee_fx.roles import HeadRoles

__all__ = ["shipped_roles", "SHIPPED"]

SHIPPED = ("smollm2-135m",)


def shipped_roles(name: str = "smollm2-135m") -> HeadRoles:
    """The learned role map shipped for model ``name`` (one of :data:`SHIPPED`)."""
    if name not in SHIPPED:
        raise ValueError(f"no shipped role map for {name!r}; expected one of {list(SHIPPED)}")
    path = importlib.resources.files("lychee_fx") / "data" / f"{name}.roles.json"
    return HeadRoles.load(str(path))
