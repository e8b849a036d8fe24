"""What the sub-commands share: model options, ``--set`` parsing, and the checks run before any work.

Every check raises :class:`~vlad.errors.VladError` with what is wrong and how to fix it, so a user
mistake ends as one ``vlad: error: ...`` line (exit code 2) before a model is built or an image read,
instead of a traceback after minutes of scoring.
"""

from __future__ import annotations

import argparse
import inspect
import os
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlad.errors import InvalidParameterError, VladError
from vlad.precision import PRECISIONS

#: exit code of a run that went to the end but could not read or score some inputs (see the error column);
#: 2 stays for the mistakes found before any work, 1 for operating-system errors (see vlad.cli.main)
EXIT_FINISHED_WITH_FAILURES = 3


def outcome_line(scored: int, failed: int) -> str:
    """The last line of ``vlad score``, the same for every engine: ``10 scored, 1 failed: see the error column``."""
    return f"{scored} scored, {failed} failed" + (": see the error column" if failed else "")


def check_readable(paths: Sequence[str | os.PathLike], what: str) -> None:
    """Read every image of ``paths`` once, now: the first unreadable one raises (references, the unlabeled
    pool, and the inputs with ``--fail-fast``).

    Raises:
        InvalidImageError: names the file and what is wrong with it.
    """
    from vlad.images import load_image
    from vlad.progress import track

    for path in track(paths, f"checking {what}"):
        load_image(path)


def add_fail_fast_option(p: argparse.ArgumentParser) -> None:
    """``--fail-fast``, for the commands that score many image files."""
    p.add_argument("--fail-fast", action="store_true",
                   help="read every input image before any work and stop at the first unreadable one (exit code "
                        "2); by default the others are scored, it gets a row with its error, and the exit code is "
                        f"{EXIT_FINISHED_WITH_FAILURES}")


class CliParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors read ``vlad: error: ...`` like every other error of the CLI."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.print_usage()
        self.exit(2, f"vlad: error: {message} (see `{self.prog} --help`)\n")


def add_model_options(p: argparse.ArgumentParser, with_set: bool = True) -> None:
    """``--weights``, ``--device`` and (``with_set``) ``--set``, shared by the commands that build models."""
    p.add_argument("--weights", default="pretrained",
                   help="'pretrained' (default; see `vlad weights list`), 'random' (real size, random init from a "
                        "fixed seed: for benchmarks), 'tiny' (miniature random models: smoke tests) or a folder "
                        "of weights")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default: cuda when available)")
    if with_set:
        p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                       help="extra scorer or detector parameter, repeatable (e.g. --set n_masks=16)")


def add_precision_option(p: argparse.ArgumentParser, loaded: str = "With --load it replaces the saved one") -> None:
    """``--precision``, shared by the commands that score with pretrained backbones (``loaded``: what it
    does to a saved detector, in the words of that command)."""
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="precision of the pretrained backbones' forward passes: fp32 (full, the default of a new "
                        "model), bf16 or fp16 (autocast: faster on a GPU; distances, calibration and fusion stay "
                        f"float32). {loaded}".rstrip())


def check_precision_option(args: argparse.Namespace) -> None:
    """Fail now if ``--precision`` cannot run on ``--device`` (e.g. bf16 on a GPU without bfloat16)."""
    if getattr(args, "precision", None) is None:
        return
    from vlad.backbones import resolve_device
    from vlad.precision import check_precision

    check_precision(args.precision, resolve_device(args.device), "--precision")


def rate(text: str) -> float:
    """argparse type: a false-alarm rate in (0, 1), as a fraction (0.05) or a percentage (5%)."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a rate such as 0.05 or 5%, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"a false-alarm rate is between 0 and 1 (e.g. 0.05 or 5%), got {text!r}")
    return value


def add_rate_option(p: argparse.ArgumentParser) -> None:
    """``--false-alarm-rate``, shared by the commands whose detectors set thresholds."""
    p.add_argument("--false-alarm-rate", type=rate, default=None, metavar="RATE",
                   help="share of good parts the thresholds may flag, e.g. 0.05 or 5%% (the default); "
                        "guaranteed once there are enough good references (see the README)")


def tile(text: str) -> tuple[int, int | None]:
    """argparse type of ``--tile``: ``SIZE`` or ``SIZE,OVERLAP`` in pixels (``0``: no tiling)."""
    from vlad.errors import InvalidParameterError
    from vlad.tiling import parse_tile_option

    try:
        return parse_tile_option(text)
    except InvalidParameterError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def pixel_count(text: str) -> int:
    """argparse type of ``--max-pixels``: a whole number of pixels >= 0 (0: no limit)."""
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number of pixels (0: no limit), got {text!r}")
    return value


def add_image_size_options(p: argparse.ArgumentParser) -> None:
    """``--tile`` and ``--max-pixels``, shared by the commands that score image files."""
    p.add_argument("--tile", type=tile, metavar="SIZE[,OVERLAP]",
                   help="score large images tile by tile: tiles of SIZE pixels (best the backbone's input size, "
                        "e.g. 448) overlapping by OVERLAP (default SIZE/4); maps are stitched at the image's "
                        "resolution. Small defects in high-resolution images need it")
    p.add_argument("--max-pixels", type=pixel_count, metavar="N",
                   help="refuse image files with more than N pixels (default 200000000; 0: no limit; also "
                        "$VLAD_MAX_IMAGE_PIXELS)")


def apply_image_size_options(args: argparse.Namespace, params: dict[str, Any]) -> dict[str, Any]:
    """Put ``--tile`` into the scorer parameters (``--set tile_size=...`` wins) and apply ``--max-pixels``."""
    if getattr(args, "max_pixels", None) is not None:
        from vlad.images import set_max_image_pixels

        set_max_image_pixels(args.max_pixels)
    if getattr(args, "tile", None) is not None:
        size, overlap = args.tile
        params.setdefault("tile_size", size or None)
        params.setdefault("tile_overlap", overlap)
    return params


def port_number(text: str) -> int:
    """argparse type: a TCP port, 1 to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number from 1 to 65535, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 1 to 65535, got {port}")
    return port


def parse_params(pairs: Sequence[str] | None) -> dict[str, Any]:
    """``["k=v", ...]`` -> dict, with values parsed as YAML scalars (numbers, booleans, lists).

    Raises:
        VladError: a pair without ``=``, an empty key, or a value YAML cannot read.
    """
    import yaml

    params: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise VladError(f"--set expects KEY=VALUE, e.g. --set n_masks=16; got {pair!r}")
        try:
            params[key.strip()] = yaml.safe_load(value)
        except (yaml.YAMLError, RecursionError) as exc:
            raise VladError(f"--set {pair!r}: the value is not a number, word or [list] ({exc})") from None
    return params


def _kind(default: Any) -> str | None:
    """The kind of value a parameter with this default takes, when it is a plain scalar."""
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, int):
        return "int"
    if isinstance(default, float):
        return "float"
    return None


def check_param_types(scorer_names: Sequence[str], params: dict[str, Any]) -> None:
    """Check ``--set`` values against the defaults of the scorers that take them (numbers stay numbers).

    A parameter whose default is a number must get a number (or null), one whose default is a boolean a
    boolean. Keys no scorer takes are left to :func:`vlad.create_detector`, which names them.

    Raises:
        InvalidParameterError: e.g. ``--set n_masks=many``.
    """
    from vlad.registry import get_scorer_class

    for name in scorer_names:
        signature = inspect.signature(get_scorer_class(name).__init__)
        for key, value in params.items():
            param = signature.parameters.get(key)
            if param is None or value is None:
                continue
            kind = _kind(param.default)
            ok = {
                None: True,
                "bool": isinstance(value, bool),
                "int": isinstance(value, int) and not isinstance(value, bool),
                "float": isinstance(value, (int, float)) and not isinstance(value, bool),
            }[kind]
            if not ok:
                wanted = {"bool": "true or false", "int": "a whole number", "float": "a number"}[kind]
                raise InvalidParameterError(
                    f"--set {key}={value!r}: {name}'s {key} expects {wanted} (default {param.default!r})"
                )


WEIGHT_MODES = ("pretrained", "random", "tiny")


def check_weights(weights: str) -> None:
    """Fail now if ``--weights`` is neither a mode nor an existing folder or file of weights."""
    if weights in WEIGHT_MODES or Path(weights).expanduser().exists():
        return
    raise VladError(
        f"--weights {weights!r} is neither one of {', '.join(WEIGHT_MODES)} nor an existing folder or file of "
        "weights; see `vlad weights list`"
    )


def check_device(device: str) -> None:
    """Fail now if ``device`` is not a device torch knows or not available here (see ``resolve_device``)."""
    from vlad.backbones import resolve_device

    resolve_device(device)


def check_output_folder(out: str | os.PathLike, option: str = "--out") -> Path:
    """Create the output folder now and check that a file can be written in it.

    Raises:
        VladError: the path is an existing file, lies under a file, or is not writable.
    """
    folder = Path(out).expanduser()
    if folder.exists() and not folder.is_dir():
        raise VladError(f"{option} {folder} is an existing file; give a folder (it is created if missing)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise VladError(
            f"{option} {folder}: cannot write there ({reason}); choose a folder you can write to"
        ) from None
    return folder


def check_port_free(host: str, port: int) -> None:
    """Fail now if ``host:port`` cannot be listened on (in use, or not an address of this machine)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise VladError(f"--host {host!r} is not an address of this machine ({exc}); e.g. --host 127.0.0.1") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        if os.name != "nt":  # as servers do: a port left in TIME_WAIT is free, one being listened on is not
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            raise VladError(
                f"cannot listen on {host}:{port} ({exc.strerror or exc}): another program uses the port, "
                f"or it needs privileges; choose another with --port, e.g. --port {port + 1 if port < 65535 else 7860}"
            ) from None


def check_prompts(prompts: str | None, object_name: str | None) -> None:
    """Read the prompt file (and the object's shipped prompts) now, so a bad file fails before any work."""
    if not prompts and not object_name:
        return
    from vlad.prompts import load_prompts

    load_prompts(prompts, object_name)


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """``--load``, ``--batch-size`` and the options of ``--engine ray`` (:mod:`vlad.distributed`)."""
    p.add_argument("--load", metavar="DETECTOR_DIR",
                   help="score with a detector saved with det.save(DIR) instead of building and fitting one; "
                        "it runs on --device, or with auto on the device it was saved on when this machine has "
                        "it, else on the CPU")
    p.add_argument("--batch-size", type=positive_int, metavar="N",
                   help="images per model call (default: the detector's batch size)")
    g = p.add_argument_group("scoring a whole archive with Ray (pip install 'vlad-inspect[ray]')")
    g.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: this process (default); ray: a pool of Ray workers writing Parquet to --out, "
                        "resumable (inputs may also be glob patterns and .txt lists of paths)")
    g.add_argument("--num-workers", type=positive_int, metavar="N",
                   help="Ray workers, each holding one detector and an equal share of the CPUs (default 1)")
    g.add_argument("--address", metavar="HOST:PORT",
                   help="a running Ray cluster (ray start --head); default: a local Ray started for the job")
    g.add_argument("--gpus-per-worker", metavar="F",
                   help="GPUs each Ray worker reserves and runs the detector on (e.g. 1, or 0.5 for two workers "
                        "per GPU; above 1 a whole number); default: CPU workers")
    g.add_argument("--overlays", action="store_true", help="with --engine ray: also write overlay PNGs")
    g.add_argument("--maps", action="store_true", help="with --engine ray: also write each map as a 16-bit PNG")
