"""What each parameter accepts, declared once and checked wherever a value enters.

A scorer class declares ``_param_specs = {"coreset_ratio": Number(0, 1, lo_open=True), ...}``: one
:class:`Spec` per ``__init__`` parameter (:class:`~vlad.scorers.base.BaseScorer` adds the specs of the
parameters many scorers share, :data:`COMMON_SPECS`, and of the tiling parameters). The one validator,
:func:`check_values`, runs at the three entry points: construction (``BaseScorer.__init_subclass__``
wraps every ``__init__``), ``set_params`` and the load of a saved config (``check_params``). The
detector's options are declared and checked the same way (:data:`vlad.detector.detector.OPTION_SPECS`).

Type rules, the same everywhere: ``bool`` is not a number; an ``int`` is accepted where a float is; numpy
scalars are accepted; NaN and infinity are not numbers here; ``None`` only where a spec says
``none=True``; a sequence is a list or tuple (JSON gives lists), never a string. Ranges are generous: they
refuse what cannot be meant (a negative count, a rate above 1, a 60000-pixel side), not what is merely
unusual; a scorer may check more once it knows its backbone (e.g. that ``image_size`` is a multiple of
the patch size).

The error is an :class:`~vlad.errors.InvalidParameterError` that names the owner, the parameter, the
accepted values and the value, e.g. ``patchcore: coreset_ratio must be a number in (0, 1], got 2.5``.

This module imports nothing heavy (torch only inside :class:`Device`, when a value is not a string).
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping as _Mapping
from typing import Any

import numpy as np

from vlad.errors import InvalidParameterError

#: the sides an ``image_size`` may ask for: inputs are resized to it, and a ViT or CNN at 4096 px already
#: holds gigabytes of activations (60000 would ask torch for tens of gigabytes)
MIN_IMAGE_SIDE = 16
MAX_IMAGE_SIDE = 4096
#: the sides a tile may have (pixels of the image, not of the network's input)
MIN_TILE_SIDE = 32
MAX_TILE_SIDE = 16384


def is_int(value: Any) -> bool:
    """A whole number: ``int`` or a numpy integer, not ``bool``."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value: Any) -> bool:
    """A finite real number: ``int``, ``float`` or a numpy scalar of either, not ``bool``, NaN or infinity."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return False
    return math.isfinite(float(value))


def _num(x: Any) -> str:
    if is_int(x) or (isinstance(x, float) and x.is_integer() and abs(x) < 1e15):
        return str(int(x))
    return f"{x:g}"


def _interval(lo: Any, hi: Any, lo_open: bool = False, hi_open: bool = False) -> str:
    """``" in [lo, hi]"``, ``" >= lo"``, ``" < hi"``, ... (empty when unbounded)."""
    if lo is None and hi is None:
        return ""
    if hi is None:
        return f" > {_num(lo)}" if lo_open else f" >= {_num(lo)}"
    if lo is None:
        return f" < {_num(hi)}" if hi_open else f" <= {_num(hi)}"
    return f" in {'(' if lo_open else '['}{_num(lo)}, {_num(hi)}{')' if hi_open else ']'}"


class Spec:
    """What one parameter accepts. ``none``: whether None is accepted too."""

    none: bool = False
    #: said after the accepted values in the error message (why, or what to do instead)
    note: str | None = None

    def explain(self, note: str) -> Spec:
        """This spec, with ``note`` added to its error message (e.g. the paper's value); returns self."""
        self.note = note
        return self

    def ok(self, value: Any) -> bool:
        """Whether ``value`` (not None) is accepted."""
        raise NotImplementedError

    def text(self) -> str:
        """The accepted values, in words (without None)."""
        raise NotImplementedError

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` is accepted, None included."""
        if value is None:
            return self.none
        try:
            return bool(self.ok(value))
        except Exception:  # a value so odd that comparing it fails is not accepted
            return False

    def describe(self) -> str:
        """The accepted values, in words, for the error message."""
        return f"None or {self.text()}" if self.none else self.text()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


class Int(Spec):
    """A whole number in ``[lo, hi]`` (either bound may be None: unbounded); ``odd``: odd numbers only."""

    def __init__(self, lo: int | None = None, hi: int | None = None, *, none: bool = False, odd: bool = False):
        self.lo, self.hi, self.none, self.odd = lo, hi, none, odd

    def ok(self, value: Any) -> bool:
        return (is_int(value) and (self.lo is None or value >= self.lo) and (self.hi is None or value <= self.hi)
                and (not self.odd or value % 2 == 1))

    def text(self) -> str:
        return ("an odd whole number" if self.odd else "a whole number") + _interval(self.lo, self.hi)


class Number(Spec):
    """A finite real number in the interval from ``lo`` to ``hi`` (closed unless ``lo_open``/``hi_open``;
    None: unbounded on that side); ints and numpy scalars are accepted."""

    def __init__(self, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                 hi_open: bool = False, none: bool = False):
        self.lo, self.hi, self.lo_open, self.hi_open, self.none = lo, hi, lo_open, hi_open, none

    def ok(self, value: Any) -> bool:
        if not is_number(value):
            return False
        v = float(value)
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)

    def text(self) -> str:
        if self.lo is None and self.hi is None:
            return "a finite number"
        return "a number" + _interval(self.lo, self.hi, self.lo_open, self.hi_open)


class Bool(Spec):
    """``True`` or ``False`` (numpy booleans too; not 0/1, not strings)."""

    def __init__(self, *, none: bool = False):
        self.none = none

    def ok(self, value: Any) -> bool:
        return isinstance(value, (bool, np.bool_))

    def text(self) -> str:
        return "True or False"


class Choice(Spec):
    """One of ``choices`` (compared with its type: ``True`` is not ``1``, ``"1"`` is not ``1``); a None
    among the choices means None is accepted."""

    def __init__(self, *choices: Any):
        self.none = None in choices
        self.choices = tuple(c for c in choices if c is not None)

    def ok(self, value: Any) -> bool:
        for c in self.choices:
            if isinstance(c, (bool, np.bool_)):
                if isinstance(value, (bool, np.bool_)) and bool(value) == c:
                    return True
            elif isinstance(c, str):
                if isinstance(value, str) and value == c:
                    return True
            elif not isinstance(value, (bool, np.bool_)) and type(value) is type(c) and value == c:
                return True
        return False

    def text(self) -> str:
        if len(self.choices) == 1:
            return repr(self.choices[0])
        return "one of " + ", ".join(repr(c) for c in self.choices)

    def describe(self) -> str:
        if not self.choices:
            return "None"
        return f"None or {self.text()}" if self.none else self.text()


class Str(Spec):
    """A non-empty string (with ``path``: or an ``os.PathLike``, e.g. a ``pathlib.Path``)."""

    def __init__(self, *, none: bool = False, path: bool = False, what: str = "a non-empty string"):
        self.none, self.path, self.what = none, path, what

    def ok(self, value: Any) -> bool:
        if self.path and isinstance(value, os.PathLike):
            return str(os.fspath(value)).strip() != ""
        return isinstance(value, str) and value.strip() != ""

    def text(self) -> str:
        return self.what


class Device(Spec):
    """A device: a non-empty string (``"cpu"``, ``"cuda:1"``, ``"auto"``, ...) or a ``torch.device``; None
    means ``"auto"``. Whether torch knows the name and this machine has it is checked at ``fit`` (and on
    load, where a missing device falls back to the CPU), so a saved GPU scorer still loads on a laptop."""

    none = True

    def ok(self, value: Any) -> bool:
        if isinstance(value, str):
            return value.strip() != ""
        import torch

        return isinstance(value, torch.device)

    def text(self) -> str:
        return "a device name ('cpu', 'cuda', 'cuda:N', 'mps', 'auto') or a torch.device"


class Seq(Spec):
    """A list or tuple (not a string) of ``min_len`` to ``max_len`` items, each accepted by ``item``;
    ``increasing``: strictly increasing."""

    def __init__(self, item: Spec, min_len: int = 1, max_len: int | None = None, *, increasing: bool = False,
                 none: bool = False, example: str | None = None):
        self.item, self.min_len, self.max_len = item, min_len, max_len
        self.increasing, self.none, self.example = increasing, none, example

    def ok(self, value: Any) -> bool:
        if not isinstance(value, (list, tuple)):
            return False
        if len(value) < self.min_len or (self.max_len is not None and len(value) > self.max_len):
            return False
        if not all(self.item.accepts(v) and v is not None for v in value):
            return False
        return not self.increasing or all(a < b for a, b in zip(value, value[1:]))

    def text(self) -> str:
        if self.max_len is not None and self.max_len == self.min_len:
            count = f"{self.min_len}"
        elif self.max_len is not None:
            count = f"{self.min_len} to {self.max_len}"
        else:
            count = f"{self.min_len} or more" if self.min_len else "any number of"
        order = "increasing " if self.increasing else ""
        item = self.item.text()
        example = f" (e.g. {self.example})" if self.example else ""
        return f"a list or tuple of {count} {order}items, each {item}{example}"


class ImageSize(Spec):
    """None, a whole number of pixels, or (with ``pair``) ``(H, W)``; each side in
    [:data:`MIN_IMAGE_SIDE`, :data:`MAX_IMAGE_SIDE`]."""

    none = True

    def __init__(self, *, pair: bool = True):
        self.pair = pair

    def _side(self, s: Any) -> bool:
        return is_int(s) and MIN_IMAGE_SIDE <= s <= MAX_IMAGE_SIDE

    def ok(self, value: Any) -> bool:
        if self.pair and isinstance(value, (tuple, list)):
            return len(value) == 2 and all(self._side(s) for s in value)
        return self._side(value)

    def text(self) -> str:
        if self.pair:
            return (f"a whole number of pixels or (H, W), each side in [{MIN_IMAGE_SIDE}, {MAX_IMAGE_SIDE}] "
                    "(for larger images use tiling, tile_size=...)")
        return (f"a whole number of pixels in [{MIN_IMAGE_SIDE}, {MAX_IMAGE_SIDE}] (the side of a square input; "
                "for larger images use tiling, tile_size=...)")

    def describe(self) -> str:
        return f"None, {self.text()}"


class TileSize(Spec):
    """None or 0 (no tiling), or the side of a square tile: a whole number of pixels in
    [:data:`MIN_TILE_SIDE`, :data:`MAX_TILE_SIDE`] (:func:`vlad.tiling.check_tiling`)."""

    none = True

    def ok(self, value: Any) -> bool:
        return is_int(value) and (value == 0 or MIN_TILE_SIDE <= value <= MAX_TILE_SIDE)

    def text(self) -> str:
        return (f"0 (no tiling), or a whole number of pixels in [{MIN_TILE_SIDE}, {MAX_TILE_SIDE}] (e.g. the "
                "backbone's input size, 448)")


class Prompts(Spec):
    """WinCLIP's ``prompts``: None, a YAML file or folder (a string or path), a dict with the YAML keys or a
    :class:`~vlad.prompts.PromptSet` (what they hold is checked by :func:`vlad.prompts.load_prompts`)."""

    none = True

    def ok(self, value: Any) -> bool:
        if isinstance(value, str):
            return value.strip() != ""
        if isinstance(value, (os.PathLike, _Mapping)):
            return True
        from vlad.prompts import PromptSet

        return isinstance(value, PromptSet)

    def text(self) -> str:
        return "a prompt YAML file or folder, a dict with the YAML keys, or a PromptSet"


class MappingOf(Spec):
    """A dict of string keys to values accepted by ``value`` (e.g. the detector's ``fusion_weights``)."""

    def __init__(self, value: Spec, *, none: bool = False, what: str = "a dict"):
        self.value, self.none, self.what = value, none, what

    def ok(self, value: Any) -> bool:
        return isinstance(value, _Mapping) and all(isinstance(k, str) and self.value.accepts(v) and v is not None
                                                   for k, v in value.items())

    def text(self) -> str:
        return f"{self.what} of names to {self.value.text()}"


#: the specs of the parameters many scorers share (a scorer with a parameter of that name gets its spec
#: unless it declares its own): the contract's meaning of these names
COMMON_SPECS: dict[str, Spec] = {
    "backbone": Str(what="a backbone weight name (see `vlad weights list`)"),
    "weights": Str(path=True, what="'pretrained', 'random', 'tiny' or a path to weights"),
    "device": Device(),
    "batch_size": Int(1, 4096),
    "image_size": ImageSize(),
    "random_state": Int(0, 2**32 - 1, none=True),
    "precision": Choice("fp32", "bf16", "fp16"),
    "sigma": Number(0, 1024),
    "max_bytes": Int(1024, 2**40),
    "tile_size": TileSize(),
    "tile_overlap": Int(0, MAX_TILE_SIDE // 2, none=True),
}


def bad_value(owner: str, name: str, spec: Spec, value: Any, where: str | None = None) -> InvalidParameterError:
    """The error of ``value`` refused by ``spec`` for parameter ``name`` of ``owner``; ``where``: the saved
    file it came from (the message then says so)."""
    note = f"; {spec.note}" if spec.note else ""
    if where:
        return InvalidParameterError(f"{where}: {name} of {owner!r} must be {spec.describe()}, got {value!r}{note}; "
                                     "the saved file was edited or damaged: correct the value, or fit and save again")
    return InvalidParameterError(f"{owner}: {name} must be {spec.describe()}, got {value!r}{note}")


def check_values(owner: str, specs: _Mapping[str, Spec], params: _Mapping[str, Any], where: str | None = None) -> None:
    """Check every value of ``params`` that ``specs`` has a spec for (the one validator).

    Args:
        owner: what the parameters belong to, for the message (a scorer name, ``"detector"``).
        specs: parameter name -> :class:`Spec`.
        params: parameter name -> value.
        where: the saved file the values were read from, or None (construction, ``set_params``).

    Raises:
        InvalidParameterError: names ``owner``, the parameter, the accepted values and the value (and ``where``).
    """
    for name, value in params.items():
        spec = specs.get(name)
        if spec is not None and not spec.accepts(value):
            raise bad_value(owner, name, spec, value, where)


# -- specs several scorers use (a scorer's table names them; the values are shared, never modified) --------
#: backbone stages of a CNN (1 = layer1, stride 4 ... 4 = layer4), increasing (:func:`vlad.features.check_layers`)
CNN_STAGES = Seq(Int(1, 4), 1, 4, increasing=True, example="(1, 2, 3)")
#: backbone stages of a CNN in any order (a scorer that passes them on as ``out_indices``)
CNN_STAGES_ANY_ORDER = Seq(Int(1, 4), 1, 4, example="(2, 3)")
#: an optimiser's learning rate (0 freezes the weights: a test of what training changes)
LEARNING_RATE = Number(0, 10)
#: an optimiser's weight decay
WEIGHT_DECAY = Number(0, 1)
#: optimisation steps or passes of a training budget (None: automatic, where a scorer says so)
STEPS = Int(1, 10_000_000)
#: a network width (channels, hidden units)
WIDTH = Int(1, 16_384)
#: a square input side only (a scorer that resizes to a square)
SQUARE_IMAGE_SIZE = ImageSize(pair=False)
#: weights of a scorer trained from scratch (:func:`vlad.scorers.autoencoder.check_weights_mode`)
SCRATCH_WEIGHTS = Choice("pretrained", "random", "tiny").explain(
    "this scorer is trained from scratch: 'random' (or its synonym 'pretrained') or 'tiny' (for tests)")
#: the backbone of a scorer trained from scratch: none
NO_BACKBONE = Choice(None).explain("this scorer is trained from scratch and takes no backbone")
#: a seed that must be a number (the scorer seeds with it directly)
SEED = Int(0, 2**32 - 1)


def scratch_training_specs(canvas_modes: tuple[str, ...]) -> dict[str, Spec]:
    """The parameters every scorer trained from scratch (autoencoder, DRAEM) shares: no backbone, its own
    weights, the canvas, the training budget, early stopping and the learning rate."""
    return {
        "backbone": NO_BACKBONE,
        "weights": SCRATCH_WEIGHTS,
        "canvas": Choice(*canvas_modes),
        "train_steps": Int(1, 10_000_000, none=True).explain("None = grows with the number of references"),
        "time_limit": Number(0, None, lo_open=True, none=True).explain("seconds; None = no cap"),
        "validation_fraction": Number(0, 1, hi_open=True),
        "patience": Int(0, 1_000_000).explain("0 = never stop early"),
        "lr": LEARNING_RATE,
    }


#: said of a map-rule parameter left at None
SEARCHED = "None = chosen at fit on synthetic defects"


def map_rule_specs(normalize_modes: tuple[str, ...], selection_modes: tuple[str, ...]) -> dict[str, Spec]:
    """The map-rule parameters of the scorers that choose theirs on synthetic defects (autoencoder, DRAEM):
    each None (searched at fit) or a fixed value, and how the choice is made."""
    return {
        "normalize": Choice(None, *normalize_modes).explain(SEARCHED),
        "sigma": Number(0, 1024, none=True).explain(SEARCHED),
        "topk_fraction": Number(0, 1, none=True).explain("0 = the map's maximum; " + SEARCHED),
        "shift_tolerance": Int(0, 1024, none=True).explain(SEARCHED),
        "selection": Choice(*selection_modes).explain(
            "'synthetic' chooses the map rule and training length on synthetic defects, 'loss' stops on the "
            "held-out loss"),
    }


#: the ``selection`` of the scorers with a pretrained backbone (STPM, EfficientAD, FastFlow, PaDiM)
BACKBONE_SELECTION = Choice(None, "synthetic").explain(
    "None = the paper's map; 'synthetic' chooses the map rule (and a trained student's training length) on "
    "synthetic defects of held-out references")
