"""Where pretrained weights come from, and the preprocessing that belongs to each.

Resolution order for ``weights="pretrained"`` (DESIGN.md §4):

1. an explicit ``weights_path`` (a folder or a file),
2. ``$VLAD_WEIGHTS_DIR/<folder>/``,
3. the Hugging Face hub cache, read with ``local_files_only=True``,
4. a download, only when not offline (``VLAD_OFFLINE``, ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``
   set to 1/true, read at call time),
5. otherwise :class:`~vlad.errors.WeightsNotAvailableError`, naming the model, every place looked, and
   the fix.

Random weights are used only when asked for (``weights="random"``, ``--weights random`` or a tiny twin).
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from vlad.errors import UnknownBackboneError, WeightsNotAvailableError

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Preprocess:
    """How images must be prepared for a backbone: RGB in [0, 1], resized, then normalised."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"


@dataclass(frozen=True)
class WeightSpec:
    """One backbone's weights: where they live upstream and how its inputs are preprocessed.

    Attributes:
        name: vlad's name for the backbone (the upstream model id).
        library: ``open_clip``, ``timm`` or ``transformers``.
        arch: the architecture name inside that library.
        hub_repo: Hugging Face repository holding the weights.
        files: files of that repository needed to load the model; ``"a|b"`` means either a or b.
        preprocess: the preprocessing the weights were trained with.
        sha256: known checksums per file (verified when present).
        pretrained_tag: open_clip's pretrained tag.
        tiny: a random-init miniature of the same architecture, for tests (never downloaded).
    """

    name: str
    library: str
    arch: str
    hub_repo: str | None
    files: tuple[str, ...]
    preprocess: Preprocess
    sha256: dict[str, str] = field(default_factory=dict)
    pretrained_tag: str | None = None
    tiny: bool = False

    @property
    def folder_name(self) -> str:
        """Folder under ``$VLAD_WEIGHTS_DIR`` (slashes become ``--``, as in the hub cache)."""
        return self.name.replace("/", "--")


_CLIP_PRE = Preprocess(240, CLIP_MEAN, CLIP_STD, "bicubic")
WEIGHTS: dict[str, WeightSpec] = {
    spec.name: spec
    for spec in [
        WeightSpec(
            "ViT-B-16-plus-240", "open_clip", "ViT-B-16-plus-240",
            "timm/vit_base_patch16_plus_clip_240.laion400m_e31",
            ("open_clip_model.safetensors|open_clip_pytorch_model.bin",),
            _CLIP_PRE, pretrained_tag="laion400m_e31",
        ),
        WeightSpec(
            "ViT-B-16", "open_clip", "ViT-B-16", "timm/vit_base_patch16_clip_224.openai",
            ("open_clip_model.safetensors|open_clip_pytorch_model.bin",), Preprocess(224, CLIP_MEAN, CLIP_STD), pretrained_tag="openai",
        ),
        WeightSpec(  # MuSc's default backbone (run at 518 px, positional embedding resized)
            "ViT-L-14-336", "open_clip", "ViT-L-14-336", "timm/vit_large_patch14_clip_336.openai",
            ("open_clip_model.safetensors|open_clip_pytorch_model.bin",), Preprocess(336, CLIP_MEAN, CLIP_STD),
            pretrained_tag="openai",
        ),
        WeightSpec(
            "vit_small_patch14_dinov2.lvd142m", "timm", "vit_small_patch14_dinov2",
            "timm/vit_small_patch14_dinov2.lvd142m", ("model.safetensors",),
            Preprocess(448, IMAGENET_MEAN, IMAGENET_STD),
        ),
        WeightSpec(
            "vit_base_patch14_dinov2.lvd142m", "timm", "vit_base_patch14_dinov2",
            "timm/vit_base_patch14_dinov2.lvd142m", ("model.safetensors",),
            Preprocess(448, IMAGENET_MEAN, IMAGENET_STD),
        ),
        WeightSpec(
            "vit_large_patch14_dinov2.lvd142m", "timm", "vit_large_patch14_dinov2",
            "timm/vit_large_patch14_dinov2.lvd142m", ("model.safetensors",),
            Preprocess(448, IMAGENET_MEAN, IMAGENET_STD),
        ),
        WeightSpec(
            "facebook/vit-mae-base", "transformers", "ViTMAEForPreTraining", "facebook/vit-mae-base",
            ("config.json", "model.safetensors|pytorch_model.bin"), Preprocess(224, IMAGENET_MEAN, IMAGENET_STD),
        ),
        WeightSpec(
            "wide_resnet50_2.tv_in1k", "timm", "wide_resnet50_2", "timm/wide_resnet50_2.tv_in1k",
            ("model.safetensors",), Preprocess(224, IMAGENET_MEAN, IMAGENET_STD),
        ),
        WeightSpec(
            "resnet18.tv_in1k", "timm", "resnet18", "timm/resnet18.tv_in1k",
            ("model.safetensors",), Preprocess(224, IMAGENET_MEAN, IMAGENET_STD),
        ),
        # Tiny random-init twins of the real architectures: for tests and smoke runs only.
        WeightSpec("tiny-clip", "open_clip", "tiny", None, (), Preprocess(96, CLIP_MEAN, CLIP_STD), tiny=True),
        WeightSpec("tiny-dino", "timm", "tiny", None, (), Preprocess(56, IMAGENET_MEAN, IMAGENET_STD), tiny=True),
        WeightSpec("tiny-mae", "transformers", "tiny", None, (), Preprocess(64, IMAGENET_MEAN, IMAGENET_STD), tiny=True),
        WeightSpec("tiny-cnn", "timm", "tiny", None, (), Preprocess(64, IMAGENET_MEAN, IMAGENET_STD), tiny=True),
    ]
}


def get_spec(name: str) -> WeightSpec:
    """The :class:`WeightSpec` for a backbone name.

    Raises:
        UnknownBackboneError: unknown name (a ``KeyError``); the message suggests the closest name and
            lists the known ones (also shown by ``vlad weights list``).
    """
    try:
        return WEIGHTS[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), list(WEIGHTS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UnknownBackboneError(
            f"unknown backbone {name!r}; {hint}known: {', '.join(WEIGHTS)} (see `vlad weights list`)"
        ) from None


def is_offline() -> bool:
    """True when any offline flag is set in the environment now (read at call time, not import time)."""
    flags = ("VLAD_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(f, "").strip().lower() in ("1", "true", "yes", "on") for f in flags)


def weights_dir() -> Path | None:
    """``$VLAD_WEIGHTS_DIR`` as a Path, or None when unset."""
    value = os.environ.get("VLAD_WEIGHTS_DIR")
    return Path(value).expanduser() if value else None


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _present(folder: Path, entry: str) -> Path | None:
    """The first existing file among the alternatives ``"a|b"`` in ``folder``."""
    for fname in entry.split("|"):
        if (folder / fname).is_file():
            return folder / fname
    return None


def hub_patterns(spec: WeightSpec) -> list[str]:
    """File names to fetch from the hub (every alternative; missing ones are simply not there)."""
    return [f for entry in spec.files for f in entry.split("|")]


def verify(spec: WeightSpec, folder: Path) -> list[str]:
    """Check the files of ``spec`` in ``folder``; returns the problems found (empty when all is well)."""
    problems = []
    for entry in spec.files:
        path = _present(folder, entry)
        if path is None:
            problems.append(f"missing {folder / entry.split('|')[0]}")
            continue
        fname = path.name
        expected = spec.sha256.get(fname)
        if expected and sha256_of(path) != expected:
            problems.append(f"sha256 mismatch for {path} (expected {expected})")
    return problems


def _has_files(spec: WeightSpec, folder: Path) -> bool:
    return folder.is_dir() and all(_present(folder, f) is not None for f in spec.files)


def _from_hub_cache(spec: WeightSpec) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(spec.hub_repo, allow_patterns=hub_patterns(spec), local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure here just means "not cached"
        return None
    return path if _has_files(spec, path) else None


def download(name: str, target: str | os.PathLike | None = None) -> Path:
    """Download the weights of ``name`` into ``target`` (default ``$VLAD_WEIGHTS_DIR/<folder>``).

    Raises:
        WeightsNotAvailableError: offline, or the download failed.
    """
    spec = get_spec(name)
    if spec.tiny:
        raise WeightsNotAvailableError(f"{name} is a random-init test model; it has no weights to download")
    if is_offline():
        raise WeightsNotAvailableError(f"cannot download {name}: an offline flag is set (VLAD_OFFLINE/HF_HUB_OFFLINE)")
    if target is None:
        base = weights_dir() or Path.home() / ".cache" / "vlad" / "weights"
        target = base / spec.folder_name
    target = Path(target)
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(spec.hub_repo, allow_patterns=hub_patterns(spec), local_dir=target)
    except Exception as exc:  # noqa: BLE001
        raise WeightsNotAvailableError(
            f"downloading {name} from the Hugging Face hub ({spec.hub_repo}) failed: {exc}"
        ) from exc
    problems = verify(spec, target)
    if problems:
        raise WeightsNotAvailableError(f"downloaded {name} but: {'; '.join(problems)}")
    return target


def resolve(name: str, weights_path: str | os.PathLike | None = None) -> Path:
    """Find the folder (or file) holding the pretrained weights of ``name``.

    Raises:
        WeightsNotAvailableError: nowhere to be found and no download possible; the message lists every
            place looked and how to fix it.
    """
    spec = get_spec(name)
    if spec.tiny:
        raise WeightsNotAvailableError(f"{name} is a random-init test model; use weights='random'")
    looked: list[str] = []
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if path.is_file() or _has_files(spec, path):
            _check(spec, path)
            return path
        looked.append(f"weights_path={path} ({'missing' if not path.exists() else 'lacks ' + ', '.join(spec.files)})")
    env_dir = weights_dir()
    if env_dir is not None:
        path = env_dir / spec.folder_name
        if _has_files(spec, path):
            _check(spec, path)
            return path
        looked.append(f"$VLAD_WEIGHTS_DIR/{spec.folder_name} = {path}")
    else:
        looked.append("$VLAD_WEIGHTS_DIR (not set)")
    cached = _from_hub_cache(spec)
    if cached is not None:
        return cached
    looked.append(f"Hugging Face cache for {spec.hub_repo}")
    if not is_offline():
        try:
            return download(name)
        except WeightsNotAvailableError as exc:
            looked.append(f"download ({exc})")
    else:
        looked.append("download skipped: offline mode (VLAD_OFFLINE/HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE)")
    raise WeightsNotAvailableError(
        f"pretrained weights for {name} ({spec.library}: {spec.hub_repo}) are not available.\n"
        "Looked in:\n  - " + "\n  - ".join(looked) + "\n"
        f"Fix: on a machine with internet run `vlad weights download {name}`, copy the folder "
        f"{spec.folder_name}/ to this machine, and set VLAD_WEIGHTS_DIR to the folder that holds it "
        "(or pass weights_path=...). For benchmarks without pretrained weights use weights='random'."
    )


def _check(spec: WeightSpec, path: Path) -> None:
    if path.is_dir():
        problems = verify(spec, path)
        if problems:
            raise WeightsNotAvailableError(f"weights for {spec.name} at {path} failed verification: {'; '.join(problems)}")
