"""Prompt ensembles for CLIP-based zero-shot scoring, and a cache of their text embeddings.

WinCLIP (Jeong et al., CVPR 2023, arXiv 2303.14814) describes each class with a *compositional prompt
ensemble*: state words ("flawless {}", "{} with defect", ...) composed with templates ("a photo of the
{}."), the object name filling the innermost ``{}``. ``prompts/default.yaml`` holds the paper's lists;
``prompts/objects/<object>.yaml`` can refine them per object; users pass their own YAML file, folder or
dict on top.

YAML schema (every key optional; missing keys keep the base values)::

    normal_states: ["{}", "flawless {}", ...]      # replace the base list
    anomalous_states: ["damaged {}", ...]
    templates: ["a photo of the {}.", ...]
    extra_normal_states: ["pristine {}"]           # appended to the base list
    extra_anomalous_states: ["scratched {}"]
    extra_templates: ["an industrial photo of the {}."]

Text embeddings are cached per ``(backbone, weights id, sentence)``: in memory (LRU, per process) and, for
pretrained weights only, on disk under ``$VLAD_CACHE_DIR`` (default ``~/.cache/vlad``) as safetensors.
So a repeated construction with the same prompts encodes nothing, and an edited prompt encodes only the
sentences that changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch

from vlad.errors import VladError

logger = logging.getLogger(__name__)

PromptsLike = Union[None, str, "os.PathLike[str]", Mapping[str, Any], "PromptSet"]

_LIST_KEYS = ("normal_states", "anomalous_states", "templates")
_EXTRA_KEYS = tuple(f"extra_{k}" for k in _LIST_KEYS)
_ALLOWED_KEYS = frozenset(_LIST_KEYS + _EXTRA_KEYS)


class PromptError(VladError, ValueError):
    """A prompt file or prompt list is malformed (the message names the file, key and entry)."""


# -- where the shipped prompts live ---------------------------------------------------------------
def prompts_dir() -> Path:
    """The folder holding ``default.yaml`` and ``objects/``: inside the installed package
    (``vlad/prompts``, placed there by the wheel's force-include) or, in a source tree, the top-level
    ``prompts/`` next to the ``vlad/`` package.

    Raises:
        PromptError: neither exists (a broken installation).
    """
    here = Path(__file__).resolve().parent
    for candidate in (here / "prompts", here.parent / "prompts"):
        if (candidate / "default.yaml").is_file():
            return candidate
    raise PromptError(
        f"vlad's prompt files were not found: expected default.yaml in {here / 'prompts'} (installed wheel) "
        f"or {here.parent / 'prompts'} (source tree). Reinstall vlad (`pip install --force-reinstall vlad-inspect`)."
    )


def object_slug(object_name: str) -> str:
    """File-name form of an object name: lower case, runs of non-alphanumerics -> ``_``."""
    return re.sub(r"[^a-z0-9]+", "_", object_name.strip().lower()).strip("_")


# -- the prompt set ------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptSet:
    """State words and templates of a compositional prompt ensemble.

    Attributes:
        normal_states: phrases with one ``{}`` for the object, describing a good object.
        anomalous_states: phrases with one ``{}`` describing a defective object.
        templates: sentences with one ``{}`` for a state phrase.
        sources: where the lists came from (files, ``"dict"``), for messages and provenance.
    """

    normal_states: tuple[str, ...]
    anomalous_states: tuple[str, ...]
    templates: tuple[str, ...]
    sources: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        for key in _LIST_KEYS:
            object.__setattr__(self, key, tuple(getattr(self, key)))
            _validate_list(getattr(self, key), key, ", ".join(self.sources) or "PromptSet")
        object.__setattr__(self, "sources", tuple(self.sources))

    def expand(self, object_name: str) -> tuple[list[str], list[str]]:
        """All sentences for ``object_name``: ``(normal_sentences, anomalous_sentences)``.

        Underscores in the name become spaces (``"metal_nut"`` -> ``"metal nut"``). Order is state-major:
        every template for the first state, then for the second, ...

        Raises:
            PromptError: the object name is empty or contains braces.
        """
        name = _clean_object_name(object_name)
        return self._compose(self.normal_states, name), self._compose(self.anomalous_states, name)

    def _compose(self, states: Sequence[str], name: str) -> list[str]:
        return [t.replace("{}", s.replace("{}", name)) for s in states for t in self.templates]

    def with_overrides(self, overrides: Mapping[str, Any], source: str = "dict") -> PromptSet:
        """A new set: lists in ``overrides`` replace these, ``extra_*`` lists are appended.

        Raises:
            PromptError: unknown keys, non-list values or malformed entries.
        """
        _check_keys(overrides, source)
        lists = {}
        for key in _LIST_KEYS:
            base = list(_as_str_list(overrides[key], key, source)) if key in overrides else list(getattr(self, key))
            extra = overrides.get(f"extra_{key}")
            if extra is not None:
                base += _as_str_list(extra, f"extra_{key}", source)
            _validate_list(base, key, source)
            lists[key] = tuple(base)
        return PromptSet(**lists, sources=(*self.sources, source))

    def to_dict(self) -> dict[str, list[str]]:
        """JSON/YAML-able form (loads back with :func:`load_prompts`)."""
        return {key: list(getattr(self, key)) for key in _LIST_KEYS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "dict") -> PromptSet:
        """A complete set from a mapping holding all three lists.

        Raises:
            PromptError: a list is missing or malformed.
        """
        _check_keys(data, source)
        missing = [k for k in _LIST_KEYS if k not in data]
        if missing:
            raise PromptError(f"{source}: a complete prompt set needs {', '.join(_LIST_KEYS)}; missing {missing}")
        return cls(*(_as_str_list(data[k], k, source) for k in _LIST_KEYS), sources=(source,))


def _clean_object_name(object_name: str) -> str:
    if not isinstance(object_name, str) or not object_name.strip():
        raise PromptError(f"object_name must be a non-empty string like 'metal plate', got {object_name!r}")
    if "{" in object_name or "}" in object_name:
        raise PromptError(f"object_name must not contain braces, got {object_name!r}")
    return " ".join(object_name.replace("_", " ").split())


def _check_keys(data: Mapping[str, Any], source: str) -> None:
    if not isinstance(data, Mapping):
        raise PromptError(f"{source}: expected a mapping with keys {sorted(_ALLOWED_KEYS)}, got {type(data).__name__}")
    unknown = sorted(set(data) - _ALLOWED_KEYS)
    if unknown:
        raise PromptError(f"{source}: unknown key(s) {unknown}; allowed keys are {sorted(_ALLOWED_KEYS)}")


def _as_str_list(value: Any, key: str, source: str) -> list[str]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise PromptError(f"{source}: {key} must be a list of strings, got {type(value).__name__} {value!r}")
    out = list(value)
    for i, item in enumerate(out):
        if not isinstance(item, str):
            raise PromptError(
                f"{source}: {key}[{i}] must be a string, got {type(item).__name__} {item!r} "
                "(quote entries in YAML: - \"{} with defect\")"
            )
    return out


def _validate_list(items: Sequence[str], key: str, source: str) -> None:
    kind = "the state phrase" if key.endswith("templates") else "the object name"
    if not items:
        raise PromptError(f"{source}: {key} is empty; give at least one entry with a '{{}}' for {kind}")
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise PromptError(f"{source}: {key}[{i}] must be a string, got {type(item).__name__}")
        n = item.count("{}")
        stray = item.replace("{}", "").count("{") + item.replace("{}", "").count("}")
        if n != 1 or stray:
            raise PromptError(
                f"{source}: {key}[{i}] = {item!r} must contain exactly one '{{}}' placeholder for {kind} "
                f"(found {n}{' plus stray braces' if stray else ''}); e.g. \"{{}} with a scratch\""
            )
        if not item.replace("{}", "").strip() and key.endswith("templates"):
            raise PromptError(f"{source}: {key}[{i}] = {item!r} is only a placeholder; write a sentence around it")


# -- loading -----------------------------------------------------------------------------------
def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PromptError(f"cannot read prompt file {path}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise PromptError(
            f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save the file as UTF-8"
        ) from exc
    except RecursionError as exc:
        raise PromptError(
            f"{path}: nested too deeply to read; a prompt file is a flat mapping of lists of strings "
            "(see prompts/default.yaml)"
        ) from exc
    except yaml.YAMLError as exc:
        raise PromptError(f"{path}: not valid YAML ({exc}); see prompts/default.yaml for the format") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PromptError(f"{path}: expected a mapping with keys {sorted(_ALLOWED_KEYS)}, got {type(data).__name__}")
    return data


def default_prompts() -> PromptSet:
    """The paper's prompt ensemble from the shipped ``default.yaml``."""
    path = prompts_dir() / "default.yaml"
    return PromptSet.from_dict(_read_yaml(path), source=str(path))


def _object_file(folder: Path, object_name: str | None) -> Path | None:
    if not object_name:
        return None
    path = folder / "objects" / f"{object_slug(object_name)}.yaml"
    try:
        return path if path.is_file() else None
    except OSError:  # e.g. a name too long for the file system: no such per-object file can exist
        return None


def load_prompts(prompts: PromptsLike = None, object_name: str | None = None) -> PromptSet:
    """Resolve a prompt specification into a :class:`PromptSet`.

    Layers, each applied on top of the previous one: the shipped ``default.yaml``; the shipped
    ``objects/<object>.yaml`` when it exists; then ``prompts``:

    * ``None``: nothing more.
    * a YAML file: its lists replace/extend the layers below.
    * a folder: its ``default.yaml`` (if any), then its ``objects/<object>.yaml`` (if any).
    * a mapping (same keys as the YAML), or a :class:`PromptSet` (used as is, no layering).

    Raises:
        PromptError: a file is missing or malformed (the message names file, key and entry); an
            ``object_name`` that is not a non-empty string.
    """
    if object_name is not None:
        _clean_object_name(object_name)  # checked where it enters: a number would fail deep inside
    if isinstance(prompts, PromptSet):
        return prompts
    base = default_prompts()
    shipped = _object_file(prompts_dir(), object_name)
    if shipped is not None:
        base = base.with_overrides(_read_yaml(shipped), source=str(shipped))
    if prompts is None:
        return base
    if isinstance(prompts, Mapping):
        return base.with_overrides(prompts, source="dict")
    if not isinstance(prompts, (str, os.PathLike)):
        raise PromptError(
            f"prompts must be None, a YAML path, a folder, a dict or a PromptSet; got {type(prompts).__name__}"
        )
    path = Path(prompts).expanduser()
    if path.is_dir():
        if (path / "default.yaml").is_file():
            base = base.with_overrides(_read_yaml(path / "default.yaml"), source=str(path / "default.yaml"))
        own = _object_file(path, object_name)
        if own is not None:
            base = base.with_overrides(_read_yaml(own), source=str(own))
        return base
    if not path.is_file():
        raise PromptError(
            f"prompt file {path} does not exist; pass a YAML file (keys: {', '.join(_LIST_KEYS)}), "
            "a folder with default.yaml/objects/, or None for the paper's prompts"
        )
    return base.with_overrides(_read_yaml(path), source=str(path))


# -- text-embedding cache ---------------------------------------------------------------------------
def cache_dir() -> Path:
    """``$VLAD_CACHE_DIR`` or ``~/.cache/vlad`` (read at call time)."""
    value = os.environ.get("VLAD_CACHE_DIR")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "vlad"


def clip_weights_id(model: torch.nn.Module) -> str:
    """A short fingerprint of a CLIP model's text tower (projection, token and position embeddings).

    Two models share it only when those weights are identical, so cached embeddings never mix models;
    it costs a few milliseconds.
    """
    digest = hashlib.sha1()
    for name in ("text_projection", "positional_embedding", "token_embedding.weight", "ln_final.weight"):
        obj: Any = model
        for part in name.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.Tensor):
            t = obj.detach().float().cpu().reshape(-1)
            digest.update(name.encode())
            digest.update(t[: 1 << 16].numpy().tobytes())
            digest.update(str(tuple(obj.shape)).encode())
    return digest.hexdigest()[:16]


class TextEmbeddingCache:
    """Text embeddings keyed by ``(backbone, weights_id, sentence)``.

    In memory: an LRU of at most ``max_entries`` sentences (shared by every scorer in the process). On
    disk (``persist=True``, meant for pretrained weights only): one safetensors file per backbone and
    weights id under ``cache_dir()/text_embeddings/``. Random or tiny models must not persist: their
    embeddings depend on an initialisation that another process would not share.

    ``stats`` counts ``hits`` (memory or disk) and ``encoded`` sentences since creation.
    """

    def __init__(self, max_entries: int = 20000) -> None:
        self.max_entries = max_entries
        self._mem: OrderedDict[tuple[str, str, str], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = {"hits": 0, "disk_hits": 0, "encoded": 0}

    def clear(self) -> None:
        """Forget the in-memory entries (the disk cache stays)."""
        with self._lock:
            self._mem.clear()

    def _disk_path(self, backbone: str, weights_id: str) -> Path:
        return cache_dir() / "text_embeddings" / backbone.replace("/", "--") / f"{weights_id}.safetensors"

    def _read_disk(self, path: Path) -> dict[str, torch.Tensor]:
        if not path.is_file():
            return {}
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                sentences = json.loads(fh.metadata()["sentences"])
                emb = fh.get_tensor("embeddings")
            return dict(zip(sentences, emb, strict=True))
        except Exception as exc:  # noqa: BLE001 - a corrupt cache is only a cache miss
            logger.warning("ignoring unreadable text-embedding cache %s (%s)", path, exc)
            return {}

    def _write_disk(self, path: Path, entries: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            sentences = list(entries)
            emb = torch.stack([entries[s] for s in sentences]).contiguous()
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            save_file({"embeddings": emb}, str(tmp), metadata={"sentences": json.dumps(sentences)})
            os.replace(tmp, path)
        except OSError as exc:
            logger.warning("could not write the text-embedding cache %s (%s)", path, exc)

    def encode(
        self,
        sentences: Sequence[str],
        encode_fn,
        *,
        backbone: str,
        weights_id: str,
        persist: bool = False,
        batch_size: int = 64,
    ) -> torch.Tensor:
        """Embeddings of ``sentences``: float32 ``(N, D)`` on the CPU, computing only the missing ones.

        Args:
            sentences: the sentences (duplicates allowed; each is encoded once).
            encode_fn: ``list[str] -> (n, D)`` tensor; called only for sentences not cached.
            backbone: backbone name (part of the key).
            weights_id: identifies the weights (see :func:`clip_weights_id`).
            persist: also read/write the on-disk cache (pretrained weights only).
            batch_size: sentences per ``encode_fn`` call.
        """
        found: dict[str, torch.Tensor] = {}
        with self._lock:
            for s in dict.fromkeys(sentences):
                key = (backbone, weights_id, s)
                if key in self._mem:
                    self._mem.move_to_end(key)
                    found[s] = self._mem[key]
            self.stats["hits"] += len(found)
        missing = [s for s in dict.fromkeys(sentences) if s not in found]
        disk: dict[str, torch.Tensor] = {}
        path = self._disk_path(backbone, weights_id)
        if missing and persist:
            disk = self._read_disk(path)
            from_disk = {s: disk[s] for s in missing if s in disk}
            found.update(from_disk)
            self.stats["disk_hits"] += len(from_disk)
            missing = [s for s in missing if s not in from_disk]
        new: dict[str, torch.Tensor] = {}
        for i in range(0, len(missing), batch_size):
            chunk = missing[i : i + batch_size]
            emb = encode_fn(chunk).detach().float().cpu()
            if emb.shape[0] != len(chunk):
                raise VladError(f"text encoder returned {emb.shape[0]} embeddings for {len(chunk)} sentences")
            new.update(zip(chunk, emb))
        self.stats["encoded"] += len(new)
        found.update(new)
        if new:
            logger.debug("encoded %d new sentences for %s (%d cached)", len(new), backbone, len(sentences) - len(new))
            if persist:
                disk.update(new)
                self._write_disk(path, disk)
        with self._lock:
            for s, e in found.items():
                self._mem[(backbone, weights_id, s)] = e
                self._mem.move_to_end((backbone, weights_id, s))
            while len(self._mem) > self.max_entries:
                self._mem.popitem(last=False)
        return torch.stack([found[s] for s in sentences])


_CACHE = TextEmbeddingCache()


def text_cache() -> TextEmbeddingCache:
    """The process-wide text-embedding cache."""
    return _CACHE
