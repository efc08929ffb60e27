"""PEP 562 lazy attributes: a package's names load from their modules on first use, so importing the
package stays light (no torch, no click) until a name is used."""
from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_getattr(module: str, where: Mapping[str, str], namespace: dict) -> Callable[[str], object]:
    """The `__getattr__` of `module`: name -> getattr(import_module(where[name]), name), cached in
    `namespace` (the module's globals) so later lookups skip it."""
    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name]), name)
        namespace[name] = value
        return value
    return __getattr__
