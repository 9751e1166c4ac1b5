"""Naming a user's objects: import strings ``"package.module:attribute"`` (what the command
line, config files, profiles and every MPI rank use) and readable names for results and
errors. No torch here: the config schema uses it."""

from __future__ import annotations

import importlib
import os
import re
import sys
from typing import Any

from .errors import UserError

IMPORT_STRING = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def is_import_string(spec: Any) -> bool:
    return isinstance(spec, str) and bool(IMPORT_STRING.match(spec))


def first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:limit]


def import_object(spec: str, what: str) -> Any:
    """The object ``"package.module:attribute"`` names; a one-line :class:`UserError`
    naming ``what`` (model, data, loss, ...) and the string when it does not import."""
    if not is_import_string(spec):
        raise UserError(f"{what} {spec!r} is not an import string; write "
                        "'package.module:attribute'")
    module_name, attr = spec.split(":", 1)
    if os.getcwd() not in sys.path and "" not in sys.path:
        # as `python -m` does: a module in the current directory (say examples/ of a
        # checkout) imports by name; kept last, so installed packages win
        sys.path.append(os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's to fix
        raise UserError(f"{what} {spec!r}: cannot import {module_name!r} "
                        f"({type(e).__name__}: {first_line(e)})") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UserError(f"{what} {spec!r}: {module_name!r} has no attribute "
                            f"{attr!r}") from None
    return obj


def describe_object(obj: Any) -> str:
    """A name for a user's object in results and errors: the string itself, else
    ``module:qualname`` (of the function inside a ``functools.partial``)."""
    if isinstance(obj, str):
        return obj
    target = getattr(obj, "func", obj)
    module = getattr(target, "__module__", None)
    name = getattr(target, "__qualname__", None) or type(target).__qualname__
    return f"{module}:{name}" if module else str(name)
