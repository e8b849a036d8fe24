"""scikit-learn's parameter protocol (``get_params``, ``set_params``, ``clone``) without importing scikit-learn.

:class:`ParamsMixin` gives a class whose ``__init__`` stores its keyword parameters as attributes of the
same names what ``sklearn.base.BaseEstimator`` gives it for parameters: ``_get_param_names``,
``get_params(deep=True)``, ``set_params(**params)`` (nested ``name__sub`` keys too) and a ``repr`` listing
the parameters that differ from their defaults. ``sklearn.base.clone`` works on it unchanged.

Why not subclass ``BaseEstimator``: importing it imports ``sklearn.utils``, which imports SciPy's
statistics and (when installed, as with Gradio) pandas and pyarrow: 1.1 s and about 145 MB of RSS in
every process that builds a scorer, before any model (measured with torch 2.14, scikit-learn 1.9).
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from vlad.errors import InvalidParameterError


def unknown_parameter(owner: str, name: str, accepted: list[str]) -> InvalidParameterError:
    """The error for parameter ``name`` that ``owner`` does not have: the closest accepted name, then all."""
    close = difflib.get_close_matches(name, accepted, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return InvalidParameterError(f"{owner} has no parameter {name!r}; {hint}its parameters are: {', '.join(accepted)}")


class ParamsMixin:
    """``get_params`` / ``set_params`` / ``repr`` for a class whose ``__init__`` stores its parameters."""

    @classmethod
    def _get_param_names(cls) -> list[str]:
        """The ``__init__`` parameter names, sorted (no ``*args``; ``**kwargs`` is ignored)."""
        init = cls.__init__
        if init is object.__init__:
            return []
        params = [p for p in inspect.signature(init).parameters.values()
                  if p.name != "self" and p.kind != p.VAR_KEYWORD]
        if any(p.kind == p.VAR_POSITIONAL for p in params):
            raise TypeError(f"{cls.__name__}.__init__ must not take *args: its parameters must have names")
        return sorted(p.name for p in params)

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The parameters as given to ``__init__``; with ``deep``, also ``name__sub`` for parameters that
        have parameters of their own."""
        out: dict[str, Any] = {}
        for name in self._get_param_names():
            value = getattr(self, name)
            if deep and hasattr(value, "get_params") and not isinstance(value, type):
                out.update((f"{name}__{k}", v) for k, v in value.get_params(deep=True).items())
            out[name] = value
        return out

    def set_params(self, **params: Any):
        """Set parameters (``name=value``, or ``name__sub=value`` on a parameter with parameters); returns self.

        Every value is checked (:meth:`_check_set_params`) before any is set, so a refused call changes nothing.

        Raises:
            InvalidParameterError: a name this class does not have (the closest one is suggested), or a value
                its check refuses.
        """
        valid = self._get_param_names()
        nested: dict[str, dict[str, Any]] = {}
        direct: dict[str, Any] = {}
        for key, value in params.items():
            name, sep, sub = key.partition("__")
            if name not in valid:
                raise unknown_parameter(type(self).__name__, name, valid)
            if sep:
                nested.setdefault(name, {})[sub] = value
            else:
                direct[name] = value
        self._check_set_params(direct)
        for name, value in direct.items():
            setattr(self, name, value)
        for name, sub_params in nested.items():
            getattr(self, name).set_params(**sub_params)
        return self

    def _check_set_params(self, params: dict[str, Any]) -> None:
        """Refuse values :meth:`set_params` is about to set (raise :class:`~vlad.errors.InvalidParameterError`);
        here, nothing is refused (a class with a declared check overrides this)."""

    def __repr__(self) -> str:
        defaults = {p.name: p.default for p in inspect.signature(type(self).__init__).parameters.values()}
        changed = []
        for name in self._get_param_names():
            value = getattr(self, name, None)
            default = defaults.get(name, inspect.Parameter.empty)
            try:
                same = value is default or bool(value == default)
            except Exception:  # e.g. arrays: compare by identity only
                same = False
            if not same:
                changed.append(f"{name}={value!r}")
        return f"{type(self).__name__}({', '.join(changed)})"
