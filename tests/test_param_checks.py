"""Every parameter is checked where it enters: construction, ``set_params`` and the load of a saved config.

For each built-in scorer and each of its ``__init__`` parameters, values of a wrong type and, where the
parameter's spec (:mod:`vlad.paramspec`) has a range or choices, values outside it go in through all three
entry points; each must be an :class:`~vlad.errors.InvalidParameterError` naming the parameter and the
value (and, on load, the file). The detector's options go through construction and the load of an edited
``detector.json``. The bad values are derived from the specs, so a new parameter is covered as soon as it
has a spec, and ``test_every_parameter_has_a_spec`` makes sure it has one.
"""

from __future__ import annotations

import inspect
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import fails_with_one_line, textured

import vlad
from vlad import paramspec as ps
from vlad.detector.detector import DETECTOR_DEFAULTS, OPTION_SPECS
from vlad.errors import InvalidParameterError
from vlad.registry import get_scorer_class

#: the built-in scorers (other test modules register toy ones)
SCORERS = [n for n in vlad.list_scorers()
           if not get_scorer_class(n).__module__.split(".")[-1].startswith("test_")]
CASES = [(n, p) for n in SCORERS for p in get_scorer_class(n)._get_param_names()]
#: scorers loaded from a folder a real fit wrote (the others from a config written as save() writes it)
REALLY_SAVED = ("patchcore", "padim")


def _out_of_range_number(spec: ps.Number) -> list[Any]:
    out: list[Any] = []
    if spec.lo is not None:
        out.append(spec.lo if spec.lo_open else spec.lo - 1)
    if spec.hi is not None:
        out.append(spec.hi if spec.hi_open else spec.hi + 1)
    return out


def _out_of_range_int(spec: ps.Int) -> list[Any]:
    out = [v for v in ((spec.lo - 1) if spec.lo is not None else None,
                       (spec.hi + 1) if spec.hi is not None else None) if v is not None]
    if spec.odd:
        out.append((spec.lo or 1) + 1)
    return out


def bad_values(spec: ps.Spec) -> list[tuple[str, Any]]:
    """``(kind, value)`` pairs ``spec`` must refuse: ``"type"`` (a wrong type) and ``"range"`` (the right
    type, outside the range or the choices), derived from the spec."""
    if isinstance(spec, ps.Int):
        return [("type", "7"), ("type", 2.5), ("type", True)] + [("range", v) for v in _out_of_range_int(spec)]
    if isinstance(spec, ps.Number):  # "nonfinite": not JSON, so not written into a saved file
        return [("type", "0.5"), ("type", True), ("type", [0.5]), ("nonfinite", math.nan), ("nonfinite", math.inf)] + [
            ("range", v) for v in _out_of_range_number(spec)]
    if isinstance(spec, ps.Bool):
        return [("type", "yes"), ("type", 1)]
    if isinstance(spec, ps.Choice):
        wrong = 1 if any(isinstance(c, bool) for c in spec.choices) else 3.5
        if spec.choices and all(ps.is_int(c) for c in spec.choices):
            other = max(spec.choices) + 32  # e.g. musc's tile_size (None or 0 only)
        else:
            other = "no-such-choice"
        return [("type", wrong), ("type", ["auto"]), ("range", other)]
    if isinstance(spec, (ps.Str, ps.Prompts, ps.Device)):
        return [("type", 3), ("type", ["a"]), ("range", ""), ("range", "   ")]
    if isinstance(spec, ps.Seq):
        item_bad = [v for kind, v in bad_values(spec.item) if kind == "range"][:1]
        out = [("type", "12"), ("type", 3), ("type", [["1"]])]
        out += [("range", list(item_bad) * max(1, spec.min_len))] if item_bad else []
        if spec.min_len > 0:
            out.append(("range", []))
        if spec.max_len is not None:  # one item too many
            good = _good_items(spec.item, spec.max_len + 1)
            if len(good) > spec.max_len:
                out.append(("range", good))
            elif not spec.increasing:
                out.append(("range", (good * (spec.max_len + 1))[: spec.max_len + 1]))
        if spec.increasing:
            two = _good_items(spec.item, 2)
            out.append(("range", two[::-1]))
        return out
    if isinstance(spec, ps.ImageSize):
        out = [("type", "224"), ("type", 224.0), ("type", True), ("range", 60000), ("range", 8)]
        out += [("range", [224, 60000]), ("range", [224])] if spec.pair else [("type", [224, 224])]
        return out
    if isinstance(spec, ps.TileSize):
        return [("type", "448"), ("type", 448.0), ("range", 16), ("range", ps.MAX_TILE_SIDE + 1), ("range", -1)]
    if isinstance(spec, ps.MappingOf):
        return [("type", [1.0]), ("type", "a"), ("range", {"patchcore": -1.0}), ("type", {"patchcore": "1"})]
    raise AssertionError(f"no bad values for {spec!r}: teach bad_values this spec")


def _good_items(item: ps.Spec, n: int) -> list[Any]:
    """Up to ``n`` increasing values ``item`` accepts (fewer when it accepts fewer)."""
    if isinstance(item, ps.Int):
        lo = item.lo if item.lo is not None else 0
        return [v for v in range(lo, lo + 4 * n) if item.accepts(v)][:n]
    lo = 0.0 if item.lo is None else float(item.lo)
    hi = lo + 1.0 if item.hi is None else float(item.hi)
    return [lo + (hi - lo) * (i + 1) / (n + 2) for i in range(n)]


def _shown(value: Any) -> tuple[str, ...]:
    """How ``value`` may be written in a message: as given, or as a tuple (JSON lists become tuples where the
    default is one)."""
    forms = [repr(value)]
    if isinstance(value, list):
        forms.append(repr(tuple(value)))
    return tuple(forms)


def _assert_names(err: pytest.ExceptionInfo, param: str, value: Any, *words: str) -> None:
    msg = str(err.value)
    assert isinstance(err.value, InvalidParameterError), msg
    assert param in msg, msg
    assert any(form in msg for form in _shown(value)), (value, msg)
    for word in words:
        assert word in msg, msg


def _bad_cases(name: str, param: str) -> list[tuple[str, Any]]:
    spec = get_scorer_class(name)._param_specs[param]
    return bad_values(spec)


# -- the specs themselves ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SCORERS)
def test_every_parameter_has_a_spec(name):
    """A new ``__init__`` parameter without a spec fails here (declare it in the class's ``_param_specs``)."""
    cls = get_scorer_class(name)
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    missing = [p for p in params if not isinstance(cls._param_specs.get(p), ps.Spec)]
    assert not missing, f"{name}: parameters without a spec in _param_specs: {missing}"


@pytest.mark.parametrize("name", SCORERS)
def test_every_default_passes_its_own_spec(name):
    cls = get_scorer_class(name)
    for p, param in inspect.signature(cls.__init__).parameters.items():
        if p != "self":
            assert cls._param_specs[p].accepts(param.default), f"{name}.{p} = {param.default!r}: {cls._param_specs[p]!r}"


def test_every_detector_option_has_a_spec_that_its_default_passes():
    assert set(OPTION_SPECS) == set(DETECTOR_DEFAULTS)
    for key, default in DETECTOR_DEFAULTS.items():
        assert OPTION_SPECS[key].accepts(default), key


def test_type_rules():
    n = ps.Number(0, 1)
    assert n.accepts(1) and n.accepts(0.5) and n.accepts(np.float32(0.5)) and n.accepts(np.int64(1))
    assert not any(n.accepts(v) for v in (True, np.bool_(True), math.nan, math.inf, "0.5", None, [0.5]))
    i = ps.Int(1, 10)
    assert i.accepts(3) and i.accepts(np.int32(3))
    assert not any(i.accepts(v) for v in (True, 3.0, np.float64(3), "3", None))
    assert ps.Int(1, 10, none=True).accepts(None)
    c = ps.Choice(False, True, "auto")
    assert c.accepts(True) and c.accepts(np.bool_(False)) and c.accepts("auto")
    assert not any(c.accepts(v) for v in (1, 0, "True", "AUTO", None))
    s = ps.Seq(ps.Int(1, 4), 1, 4, increasing=True)
    assert s.accepts((1, 2)) and s.accepts([2, 3])
    assert not any(s.accepts(v) for v in ("12", (2, 1), (1, 1), (), (1, 2, 3, 4, 4), (1, True)))
    assert str(ps.bad_value("patchcore", "coreset_ratio", ps.Number(0, 1, lo_open=True), 2.5)) == \
        "patchcore: coreset_ratio must be a number in (0, 1], got 2.5"


# -- construction -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, param", CASES)
def test_construction_refuses_bad_values(name, param):
    cls = get_scorer_class(name)
    for _, bad in _bad_cases(name, param):
        with pytest.raises(InvalidParameterError) as err:
            vlad.create_scorer(name, **{param: bad})
        _assert_names(err, param, bad, f"{name}:")
        with pytest.raises(InvalidParameterError) as err:  # the class itself, as clone() builds it
            cls(**{param: bad})
        _assert_names(err, param, bad)


# -- set_params ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, param", CASES)
def test_set_params_refuses_bad_values_and_changes_nothing(name, param):
    scorer = vlad.create_scorer(name)
    before = scorer.get_params(deep=False)
    beside = {} if param == "batch_size" else {"batch_size": 3}  # a good value set in the same call
    for _, bad in _bad_cases(name, param):
        with pytest.raises(InvalidParameterError) as err:
            scorer.set_params(**beside, **{param: bad})
        _assert_names(err, param, bad)
        assert scorer.get_params(deep=False) == before  # nothing was set, not even the good value beside it


# -- load of a saved config ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """Folders really written by ``fit(...).save(...)`` for the scorers of :data:`REALLY_SAVED`."""
    root = tmp_path_factory.mktemp("saved")
    refs = [textured(i, 64) for i in range(2)]
    return {n: vlad.create_scorer(n, weights="tiny", image_size=64).fit(refs).save(root / n) for n in REALLY_SAVED}


def _config_folder(name: str, tmp_path: Path, saved: dict[str, Path]) -> Path:
    """A scorer folder to edit: a copy of a real save, or ``config.json`` as save() writes it (its state
    file is never reached: the parameters are checked first)."""
    folder = tmp_path / name
    if name in saved:
        shutil.copytree(saved[name], folder)
        return folder
    from vlad.scorers.base import CONFIG_FILE, FORMAT_VERSION, STATE_FILE
    from vlad.serialization import to_jsonable

    folder.mkdir()
    params = to_jsonable(vlad.create_scorer(name).get_params(deep=False), name)
    config = {"format_version": FORMAT_VERSION, "scorer": name, "params": params, "n_references": 0, "meta": {},
              "sha256": {STATE_FILE: "0" * 64}}
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("name, param", CASES)
def test_load_refuses_an_edited_saved_value(name, param, tmp_path, saved):
    folder = _config_folder(name, tmp_path, saved)
    config_path = folder / "config.json"
    original = json.loads(config_path.read_text())
    for kind, bad in _bad_cases(name, param):
        if kind == "nonfinite":
            continue
        config = json.loads(json.dumps(original))
        config["params"][param] = bad
        config_path.write_text(json.dumps(config))
        with pytest.raises(InvalidParameterError) as err:
            vlad.load(folder)
        _assert_names(err, param, bad, "config.json", repr(name))


def test_a_really_saved_scorer_still_loads(saved):
    for name, folder in saved.items():
        assert vlad.load(folder).get_params()["image_size"] == 64, name


# -- the detector --------------------------------------------------------------------------------------------
OPTIONS = sorted(OPTION_SPECS)


@pytest.mark.parametrize("option", OPTIONS)
def test_detector_construction_refuses_bad_options(option):
    for _, bad in bad_values(OPTION_SPECS[option]):
        with pytest.raises(InvalidParameterError) as err:
            vlad.create_detector("patchcore", weights="tiny", **{option: bad})
        _assert_names(err, option, bad, "detector")


@pytest.fixture(scope="module")
def saved_detector(tmp_path_factory) -> Path:
    """A detector whose maeday is fitted (zero-shot) and whose patchcore is inactive (no references yet):
    its ``detector.json`` holds the options and patchcore's parameters."""
    det = vlad.create_detector("maeday+patchcore", weights="tiny", scorer_options={"maeday": {"n_masks": 2}}).fit()
    return det.save(tmp_path_factory.mktemp("det") / "det")


def _edited_detector(saved_detector: Path, tmp_path: Path, edit) -> Path:
    folder = tmp_path / "det"
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(saved_detector, folder)
    doc = json.loads((folder / "detector.json").read_text())
    edit(doc)
    (folder / "detector.json").write_text(json.dumps(doc))
    return folder


@pytest.mark.parametrize("option", OPTIONS)
def test_detector_load_refuses_an_edited_saved_option(option, saved_detector, tmp_path):
    for kind, bad in bad_values(OPTION_SPECS[option]):
        if kind == "nonfinite":
            continue
        folder = _edited_detector(saved_detector, tmp_path, lambda doc: doc["options"].__setitem__(option, bad))
        with pytest.raises(InvalidParameterError) as err:
            vlad.load(folder)
        _assert_names(err, option, bad, "detector.json")


def test_detector_load_refuses_an_edited_parameter_of_a_saved_scorer(saved_detector, tmp_path):
    assert vlad.load(saved_detector).active_ == {"maeday": True, "patchcore": False}
    for param, bad in (("coreset_ratio", 2.5), ("layers", [2, 9]), ("batch_size", 0), ("precision", "fp8")):
        folder = _edited_detector(saved_detector, tmp_path,
                                  lambda doc: doc["scorers"]["patchcore"]["params"].__setitem__(param, bad))
        with pytest.raises(InvalidParameterError) as err:
            vlad.load(folder)
        _assert_names(err, param, bad, "detector.json", "'patchcore'")


# -- routing and the command line ----------------------------------------------------------------------------
def test_detector_routing_passes_shared_options_through_the_checks():
    det = vlad.create_detector("patchcore+padim", weights="tiny", batch_size=2, tile_size=64,
                               scorer_options={"padim": {"n_features": 20}})
    assert all(s.batch_size == 2 and s.tile_size == 64 for s in det.scorers.values())
    with pytest.raises(InvalidParameterError, match=r"padim: n_features .* got 0"):
        vlad.create_detector("patchcore+padim", weights="tiny", scorer_options={"padim": {"n_features": 0}})


def test_the_command_line_prints_a_refused_value_in_one_line(capsys, tmp_path):
    from PIL import Image

    image = tmp_path / "a.png"
    Image.fromarray(textured(0, 64)).save(image)
    line = fails_with_one_line(capsys, ["score", str(image), "--scorer", "spade", "--weights", "tiny",
                                        "--set", "k=-1"], "spade", "k must be", "-1")
    assert "[1, 1000000]" in line
    fails_with_one_line(capsys, ["score", str(image), "--scorer", "patchcore", "--weights", "tiny",
                                 "--set", "coreset_ratio=2.5"], "coreset_ratio", "(0, 1]", "2.5")
