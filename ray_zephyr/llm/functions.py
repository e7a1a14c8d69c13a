"""Python functions named in recipes as "module:function": a generator or a judge of kind function, a verifier."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from ray_zephyr.errors import UserError


def load_function(spec: str) -> Callable:
    module_name, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"function {spec!r} cannot be loaded: {exc}") from None
