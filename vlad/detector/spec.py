"""Detector specs and option routing: ``"winclip+maeday+anomalydino"`` plus options -> named scorers.

This is the one place where options are routed to scorers: :func:`vlad.create_detector`, the command
line, the evaluation and the app all build through it. Detector options (see
:data:`vlad.detector.detector.DETECTOR_DEFAULTS`) stay with the detector; any other option goes to
every scorer whose ``get_params()`` has it and must be accepted by at least one (except the shared
ones, :data:`SHARED_OPTIONS`, which a detector without e.g. a text-prompted scorer simply does not
use); ``scorer_options={"maeday": {"n_masks": 16}}`` sets one scorer's parameters.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from vlad.errors import InvalidParameterError, UnknownScorerError, VladError
from vlad.registry import create_scorer, get_scorer_class, list_scorers, parameter_names

DEFAULT_SPEC = "winclip+maeday+anomalydino"

#: scorer parameters many scorers share: silently not routed to a scorer (or detector) that lacks them
SHARED_OPTIONS = frozenset({"object_name", "prompts", "weights", "device", "precision", "batch_size",
                            "random_state"})


def parse_spec(spec: str | Sequence[str] | None) -> list[str]:
    """``"a+b"`` (or ``["a", "b"]``, or None for :data:`DEFAULT_SPEC`) -> checked list of scorer names.

    Raises:
        UnknownScorerError: a name is not registered.
        VladError: empty or repeated names.
    """
    if spec is None:
        spec = DEFAULT_SPEC
    if not isinstance(spec, (str, Sequence)):
        raise InvalidParameterError(f"a detector spec is a string like {DEFAULT_SPEC!r}, got {type(spec).__name__}")
    names = [s.strip() for s in spec.split("+")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    if not names or any(not n for n in names):
        raise InvalidParameterError(f"a detector spec is scorer names joined by '+', e.g. {DEFAULT_SPEC!r}; "
                                    f"got {spec!r}")
    if len(set(names)) != len(names):
        raise InvalidParameterError(f"detector spec {spec!r} names a scorer twice")
    known = list_scorers()
    for n in names:
        if n not in known:
            raise UnknownScorerError(f"unknown scorer {n!r} in detector spec {spec!r}{did_you_mean(n, known)}; "
                                     f"available: {', '.join(known)}")
    return names


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest choice, or ``""``."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def build_scorers(
    names: Sequence[str],
    options: Mapping[str, Any],
    scorer_options: Mapping[str, Any] | None,
    detector_options: Iterable[str] = (),
) -> dict[str, Any]:
    """Unfitted scorers for ``names`` with ``options`` routed to those that accept them.

    Args:
        names: checked scorer names (:func:`parse_spec`).
        options: shared scorer parameters (detector options already removed).
        scorer_options: scorer name -> its own parameters (override the shared ones).
        detector_options: the detector's option names (only to make error messages complete).

    Raises:
        VladError: an option accepted by no scorer, or bad ``scorer_options`` (with the closest names).
    """
    scorer_options = scorer_options or {}
    if not isinstance(scorer_options, Mapping):
        raise InvalidParameterError(f"scorer_options must map scorer name -> dict of parameters, got "
                                    f"{type(scorer_options).__name__}")
    unknown = set(scorer_options) - set(names)
    if unknown:
        raise InvalidParameterError(f"scorer_options names {sorted(unknown)}, which are not in the spec {list(names)}")
    accepted = {n: set(parameter_names(get_scorer_class(n))) for n in names}
    every = set().union(*accepted.values(), detector_options)
    unrouted = [k for k in options if k not in SHARED_OPTIONS and not any(k in accepted[n] for n in names)]
    if unrouted:
        hints = "".join(did_you_mean(k, every) for k in unrouted)
        raise InvalidParameterError(
            f"option(s) {unrouted} are accepted by no scorer of {list(names)} and are not detector options "
            f"({sorted(detector_options)}){hints}; check the spelling, or pass per-scorer options as "
            "scorer_options={'name': {...}}"
        )
    scorers = {}
    for n in names:
        cls = get_scorer_class(n)
        params = {k: v for k, v in options.items()
                  if k in accepted[n] and (cls.tiles or k not in ("tile_size", "tile_overlap"))}
        own = scorer_options.get(n) or {}
        if not isinstance(own, Mapping):
            raise InvalidParameterError(f"scorer_options[{n!r}] must be a dict of parameters, got {type(own).__name__}")
        bad = sorted(set(own) - accepted[n])
        if bad:
            hints = "".join(did_you_mean(k, accepted[n]) for k in bad)
            raise InvalidParameterError(f"scorer {n!r} has no parameter(s) {bad}{hints}; it accepts "
                                        f"{sorted(accepted[n])}")
        params.update(own)
        scorers[n] = create_scorer(n, **params)
    if not scorers:
        raise VladError("a detector needs at least one scorer")
    return scorers
