"""MVTec-layout benchmark folders: category discovery, ground-truth masks and seeded k-shot draws.

The layout (MVTec AD, Bergmann et al. CVPR 2019; also used by VisA/MPDD/KSDD conversions)::

    <set>/<category>/train/good/*.png
    <set>/<category>/test/good/*.png
    <set>/<category>/test/<defect>/*.png
    <set>/<category>/ground_truth/<defect>/<stem>_mask.png      (optional: image-level sets have none)

>>> from vlad.data import discover_categories, draw_references  # doctest: +SKIP
>>> cat = discover_categories("data/mpdd")[0]
>>> refs = draw_references(cat, k=4, seed=0)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from vlad.errors import VladError
from vlad.images import IMAGE_SUFFIXES

logger = logging.getLogger(__name__)

GOOD = "good"
LAYOUT_HELP = (
    "expected the MVTec AD layout: <category>/train/good/*.png, <category>/test/good/*.png, "
    "<category>/test/<defect>/*.png and optionally <category>/ground_truth/<defect>/<stem>_mask.png"
)


class DatasetLayoutError(VladError, ValueError):
    """A folder is not in the MVTec layout (or is missing what an operation needs)."""


@dataclass(frozen=True)
class Category:
    """One category of an MVTec-layout set.

    Attributes:
        name: folder name, e.g. ``"metal_plate"``.
        root: the category folder.
        train_paths: normal training images (``train/good``), sorted.
        test_paths: test images, sorted by defect type (``good`` first) then file name.
        labels: int ``(N_test,)``, 1 = anomalous.
        defect_types: per test image, ``"good"`` or the defect folder name.
        mask_paths: per test image, the ground-truth mask or None (normal images, or no masks).
    """

    name: str
    root: Path
    train_paths: tuple[Path, ...]
    test_paths: tuple[Path, ...]
    labels: np.ndarray
    defect_types: tuple[str, ...]
    mask_paths: tuple[Path | None, ...]
    missing_masks: tuple[Path, ...] = field(default=())

    @property
    def object_name(self) -> str:
        """The category name in words (``"metal_plate"`` -> ``"metal plate"``), for zero-shot prompts."""
        return self.root.name.replace("_", " ").strip()

    @property
    def has_masks(self) -> bool:
        """True when every anomalous test image has a ground-truth mask (pixel metrics possible)."""
        anomalous = [m for m, y in zip(self.mask_paths, self.labels) if y]
        return bool(anomalous) and all(m is not None for m in anomalous)

    @property
    def n_test(self) -> int:
        return len(self.test_paths)

    def subset(self, indices: Sequence[int]) -> Category:
        """A copy keeping only the test images at ``indices`` (train images unchanged)."""
        idx = [int(i) for i in indices]
        return Category(
            self.name, self.root, self.train_paths,
            tuple(self.test_paths[i] for i in idx), self.labels[idx].copy(),
            tuple(self.defect_types[i] for i in idx), tuple(self.mask_paths[i] for i in idx),
            self.missing_masks,
        )

    def limited(self, limit: int | None) -> Category:
        """At most ``limit`` test images, spread evenly over the sorted list so every defect type and the
        good images stay represented (deterministic; no randomness)."""
        if limit is None or limit >= self.n_test:
            return self
        if limit < 1:
            raise VladError(f"limit must be at least 1, got {limit}")
        idx = np.unique(np.round(np.linspace(0, self.n_test - 1, limit)).astype(int))
        return self.subset(idx)


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def _find_mask(gt_dir: Path, image: Path) -> Path | None:
    for cand in (gt_dir / f"{image.stem}_mask.png", gt_dir / f"{image.stem}.png",
                 gt_dir / f"{image.stem}_mask{image.suffix}"):
        if cand.is_file():
            return cand
    return None


def is_category(folder: str | Path) -> bool:
    """True when ``folder`` looks like one category (has a ``test`` folder with image subfolders)."""
    test = Path(folder) / "test"
    return test.is_dir() and any(d.is_dir() for d in test.iterdir())


def load_category(folder: str | Path) -> Category:
    """Read one category folder.

    Raises:
        DatasetLayoutError: the folder is not in the MVTec layout, or its test split has no images.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DatasetLayoutError(f"{root}: no such folder; {LAYOUT_HELP}")
    if not is_category(root):
        raise DatasetLayoutError(f"{root}: no test/<type>/ folders found; {LAYOUT_HELP}")
    train = _images_in(root / "train" / GOOD)
    if not train:
        logger.warning("%s: no images in train/good; only zero-shot evaluation is possible", root)
    types = sorted(d.name for d in (root / "test").iterdir() if d.is_dir() and not d.name.startswith("."))
    types.sort(key=lambda t: t != GOOD)  # good first, then defects alphabetically
    gt_root = root / "ground_truth"
    tests, labels, defects, masks, missing = [], [], [], [], []
    for t in types:
        for img in _images_in(root / "test" / t):
            tests.append(img)
            labels.append(0 if t == GOOD else 1)
            defects.append(t)
            if t == GOOD:
                masks.append(None)
                continue
            mask = _find_mask(gt_root / t, img) if gt_root.is_dir() else None
            if mask is None and gt_root.is_dir():
                missing.append(img)
            masks.append(mask)
    if not tests:
        raise DatasetLayoutError(f"{root}: test/ holds no image files ({', '.join(IMAGE_SUFFIXES)}); {LAYOUT_HELP}")
    if missing:
        logger.warning("%s: %d anomalous test images have no mask under ground_truth/ (e.g. %s); pixel metrics "
                       "are skipped for this category", root, len(missing), missing[0].name)
    return Category(root.name, root, tuple(train), tuple(tests), np.asarray(labels, dtype=np.int64),
                    tuple(defects), tuple(masks), tuple(missing))


def discover_categories(data_dir: str | Path, names: Sequence[str] | None = None) -> list[Category]:
    """The categories in ``data_dir``: a set folder holding categories, one category folder itself, or a
    folder of sets (categories two levels down; a name shared by two sets becomes ``"<set>/<category>"``).

    Args:
        data_dir: e.g. ``data/mpdd`` (categories inside) or ``data/mpdd/metal_plate``.
        names: keep only these categories (all must exist).

    Raises:
        DatasetLayoutError: nothing in MVTec layout was found, or a requested name does not exist.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise DatasetLayoutError(f"{root}: no such folder; pass a dataset folder or one category folder")
    if is_category(root):
        found = {root.name: root}
    else:
        found = {d.name: d for d in sorted(root.iterdir()) if d.is_dir() and is_category(d)}
        if not found:  # a folder of sets, e.g. data/{mpdd,ksdd}/<category>: one level deeper
            nested = [c for d in sorted(root.iterdir()) if d.is_dir() for c in sorted(d.iterdir())
                      if c.is_dir() and is_category(c)]
            folder_names = [c.name for c in nested]
            found = {(c.name if folder_names.count(c.name) == 1 else f"{c.parent.name}/{c.name}"): c
                     for c in nested}
    if not found:
        raise DatasetLayoutError(f"{root}: neither a category nor a folder of categories; {LAYOUT_HELP}")
    if names:
        unknown = [n for n in names if n not in found]
        if unknown:
            raise DatasetLayoutError(f"{root}: no categories {unknown}; available: {sorted(found)}")
        found = {n: found[n] for n in names}
    cats = [load_category(path) for path in found.values()]
    return [c if c.name == key else replace(c, name=key) for key, c in zip(found, cats)]


def load_mask(path: str | Path | None, size: tuple[int, int]) -> np.ndarray:
    """A ground-truth mask as bool ``(H, W)`` at ``size`` = ``(H, W)`` (nearest-neighbour resize).

    ``path`` None (a normal image) gives an all-False mask. Any nonzero pixel counts as anomalous.

    Raises:
        DatasetLayoutError: the mask file cannot be read.
    """
    h, w = int(size[0]), int(size[1])
    if path is None:
        return np.zeros((h, w), dtype=bool)
    try:
        with Image.open(path) as img:
            img.load()
            mask_img = img.convert("L") if img.mode not in ("L", "1", "I", "I;16", "F") else img
            if mask_img.size != (w, h):
                mask_img = mask_img.resize((w, h), Image.Resampling.NEAREST)
            return np.asarray(mask_img) > 0
    except (OSError, ValueError) as exc:
        raise DatasetLayoutError(f"{path}: cannot read the ground-truth mask ({exc})") from exc


def draw_references(category: Category, k: int | str | None, seed: int = 0) -> list[Path]:
    """``k`` distinct normal training images drawn with ``numpy.random.default_rng(seed)``.

    The same ``(category, k, seed)`` always gives the same images (returned in file order).
    ``k`` = ``"all"`` or None returns every training image; ``k`` = 0 returns an empty list.

    Raises:
        DatasetLayoutError: ``k`` is negative or larger than the number of training images.
    """
    n = len(category.train_paths)
    if k is None or (isinstance(k, str) and k.lower() == "all"):
        if n == 0:
            raise DatasetLayoutError(f"{category.root}: train/good holds no images to use as references")
        return list(category.train_paths)
    if isinstance(k, str) or int(k) != k or k < 0:
        raise DatasetLayoutError(f"k must be a non-negative integer or 'all', got {k!r}")
    k = int(k)
    if k > n:
        raise DatasetLayoutError(
            f"{category.name}: asked for {k} reference images but train/good holds only {n}; use k <= {n} "
            "or 'all'"
        )
    if k == 0:
        return []
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(n, size=k, replace=False))
    return [category.train_paths[i] for i in idx]
