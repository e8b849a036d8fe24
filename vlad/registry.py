"""Scorer registry: one dict from name to class, filled lazily for built-ins and by a decorator for plugins."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from vlad.errors import InvalidArgumentError, UnknownScorerError
from vlad.params import unknown_parameter

# Built-in scorers, imported on first use so `import vlad` stays fast.
_BUILTIN: dict[str, str] = {
    "winclip": "vlad.scorers.winclip:WinCLIP",
    "maeday": "vlad.scorers.maeday:MAEDAY",
    "anomalydino": "vlad.scorers.anomalydino:AnomalyDINO",
    "patchcore": "vlad.scorers.patchcore:PatchCore",
    "padim": "vlad.scorers.padim:PaDiM",
    "fastflow": "vlad.scorers.fastflow:FastFlow",
    "stpm": "vlad.scorers.stpm:STPM",
    "efficientad": "vlad.scorers.efficientad:EfficientAD",
    "autoencoder": "vlad.scorers.autoencoder:AutoEncoder",
    "draem": "vlad.scorers.draem:DRAEM",
    "patchsvdd": "vlad.scorers.svdd:PatchSVDD",
    "spade": "vlad.scorers.spade:SPADE",
    "musc": "vlad.scorers.musc:MuSc",
}
_PLUGINS: dict[str, type] = {}


def register_scorer(name: str) -> Callable[[type], type]:
    """Class decorator that registers a scorer under ``name``.

    Raises:
        InvalidArgumentError: the name is already taken (a ``ValueError`` too).
    """

    def decorator(cls: type) -> type:
        if name in _BUILTIN or name in _PLUGINS:
            raise InvalidArgumentError(f"a scorer named {name!r} is already registered; choose another name "
                                       f"(taken: {', '.join(list_scorers())})")
        _PLUGINS[name] = cls
        cls.scorer_name = name
        return cls

    return decorator


def list_scorers() -> list[str]:
    """Names of every registered scorer, sorted."""
    return sorted({*_BUILTIN, *_PLUGINS})


def get_scorer_class(name: str) -> type:
    """The class registered as ``name``.

    Raises:
        UnknownScorerError: no scorer has that name; the message lists those that exist.
    """
    if name in _PLUGINS:
        return _PLUGINS[name]
    if name not in _BUILTIN:
        raise UnknownScorerError(f"unknown scorer {name!r}; available: {', '.join(list_scorers())}")
    module_name, cls_name = _BUILTIN[name].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    cls.scorer_name = name
    return cls


def registered_name(cls: type) -> str | None:
    """The name ``cls`` itself is registered under (a subclass does not inherit its parent's), or None.

    A built-in class built directly (``MuSc(...)``, not ``create_scorer("musc")``) has its name here
    too, so what it saves loads again."""
    for name, plugin in _PLUGINS.items():
        if plugin is cls:
            return name
    where = f"{cls.__module__}:{cls.__qualname__}"
    for name, path in _BUILTIN.items():
        if path == where:
            return name
    return None


def parameter_names(cls: type) -> list[str]:
    """The parameters a scorer class accepts (scikit-learn's ``_get_param_names``), sorted."""
    get_names = getattr(cls, "_get_param_names", None)
    return sorted(get_names()) if get_names is not None else []


def check_parameters(name: str, params: dict[str, Any]) -> None:
    """Raise if ``params`` holds a key the scorer ``name`` does not accept, suggesting the closest one.

    Raises:
        UnknownScorerError: no scorer has that name.
        InvalidParameterError: an unknown parameter; the message suggests the closest valid name and
            lists them all.
    """
    cls = get_scorer_class(name)
    accepted = parameter_names(cls)
    if not accepted:  # a plugin that does not follow scikit-learn's rules: let its __init__ decide
        return
    for key in params:
        if key not in accepted:
            raise unknown_parameter(f"scorer {name!r}", key, accepted)


def create_scorer(name: str, **params: Any):
    """Build the scorer ``name`` with ``params`` (stored only; nothing loads until ``fit``).

    Raises:
        UnknownScorerError: no scorer has that name; the message lists those that exist.
        InvalidParameterError: a parameter the scorer does not have (the closest valid name is suggested).
    """
    check_parameters(name, params)
    return get_scorer_class(name)(**params)
