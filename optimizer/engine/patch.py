"""Change what one module instance does when called, without wrapping or copying it.

abopt steers projections and captures decoder-layer outputs on the model mlx-lm built. A
wrapper module would rename every parameter under it (``o_proj.weight`` →
``o_proj.inner.weight``) and break ``isinstance`` checks; instead the instance's class is
swapped for a cached subclass whose ``__call__`` adds the behaviour, and swapped back on
``unpatch``. Parameters, paths and types stay exactly as mlx-lm made them.
"""

from __future__ import annotations

from typing import Any, Callable

import mlx.nn as nn

# (base class, hook) -> patched subclass; hooks are module-level functions, so this stays small.
_SUBCLASSES: dict[tuple[type, Callable], type] = {}


def patch(module: nn.Module, hook: Callable[..., Any]) -> None:
    """Make ``module(*args)`` return ``hook(module, base_call, *args)``."""
    base = getattr(type(module), "_abopt_base", type(module))
    key = (base, hook)
    if key not in _SUBCLASSES:

        def __call__(self, *args, **kwargs):
            return hook(self, base.__call__, *args, **kwargs)

        _SUBCLASSES[key] = type(base.__name__, (base,), {"__call__": __call__, "_abopt_base": base})
    module.__class__ = _SUBCLASSES[key]


def unpatch(module: nn.Module) -> None:
    """Give ``module`` back its original class."""
    base = getattr(type(module), "_abopt_base", None)
    if base is not None:
        module.__class__ = base


def is_patched(module: nn.Module) -> bool:
    return hasattr(type(module), "_abopt_base")


def set_private(module: nn.Module, **values: Any) -> None:
    """Attach per-instance state that mlx never treats as a parameter."""
    for name, value in values.items():
        object.__setattr__(module, name, value)
