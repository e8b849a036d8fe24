"""MVTec-layout discovery, masks and seeded reference draws (vlad.data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import textured, with_defect
from vlad.data import DatasetLayoutError, discover_categories, draw_references, load_category, load_mask
from vlad.errors import VladError

BOX = (20, 36, 24, 44)  # y0, y1, x0, x1 of the synthetic defect


def make_mvtec(root: Path, name: str = "metal_plate", n_train: int = 5, n_good: int = 3, n_bad: int = 3,
               masks: bool = True, size: int = 64, defects: tuple[str, ...] = ("scratch",)) -> Path:
    """Write a tiny MVTec-layout category under ``root`` and return its folder."""
    cat = root / name
    (cat / "train" / "good").mkdir(parents=True)
    (cat / "test" / "good").mkdir(parents=True)
    for i in range(n_train):
        Image.fromarray(textured(i, size)).save(cat / "train" / "good" / f"{i:03d}.png")
    for i in range(n_good):
        Image.fromarray(textured(100 + i, size)).save(cat / "test" / "good" / f"{i:03d}.png")
    for d, defect in enumerate(defects):
        (cat / "test" / defect).mkdir(parents=True)
        if masks:
            (cat / "ground_truth" / defect).mkdir(parents=True)
        for i in range(n_bad):
            y0, y1, x0, x1 = BOX
            box = (y0 + i, y1 + i, x0 + 2 * d, x1 + 2 * d)
            img = with_defect(textured(200 + 10 * d + i, size), box)
            Image.fromarray(img).save(cat / "test" / defect / f"{i:03d}.png")
            if masks:
                m = np.zeros((size, size), np.uint8)
                m[box[0]:box[1], box[2]:box[3]] = 255
                Image.fromarray(m).save(cat / "ground_truth" / defect / f"{i:03d}_mask.png")
    return cat


def test_discover_category_with_masks(tmp_path):
    make_mvtec(tmp_path, defects=("crack", "scratch"))
    (cat,) = discover_categories(tmp_path)
    assert cat.name == "metal_plate" and cat.object_name == "metal plate"
    assert len(cat.train_paths) == 5 and cat.n_test == 3 + 6
    assert cat.labels.tolist() == [0] * 3 + [1] * 6
    assert cat.defect_types == ("good",) * 3 + ("crack",) * 3 + ("scratch",) * 3
    assert cat.has_masks
    assert all(m is None for m in cat.mask_paths[:3])
    assert [m.name for m in cat.mask_paths[3:6]] == ["000_mask.png", "001_mask.png", "002_mask.png"]
    assert cat.mask_paths[6].parent.name == "scratch"
    mask = load_mask(cat.mask_paths[3], (64, 64))
    assert mask.dtype == bool and mask.sum() == 16 * 20 and mask[BOX[0], BOX[2]]
    assert not load_mask(None, (10, 12)).any() and load_mask(None, (10, 12)).shape == (10, 12)
    small = load_mask(cat.mask_paths[3], (32, 32))  # nearest resize
    assert small.shape == (32, 32) and set(np.unique(small)) <= {False, True} and small.sum() == 8 * 10


def test_discover_without_masks_and_from_set_folder(tmp_path):
    make_mvtec(tmp_path, "bottle", masks=False)
    make_mvtec(tmp_path, "metal_plate")
    (tmp_path / "README.md").write_text("not a category")
    cats = discover_categories(tmp_path)
    assert [c.name for c in cats] == ["bottle", "metal_plate"]
    assert not cats[0].has_masks and all(m is None for m in cats[0].mask_paths)
    assert cats[1].has_masks
    assert [c.name for c in discover_categories(tmp_path, ["metal_plate"])] == ["metal_plate"]
    # one category folder itself
    assert discover_categories(tmp_path / "bottle")[0].name == "bottle"
    with pytest.raises(DatasetLayoutError, match="no categories"):
        discover_categories(tmp_path, ["cable"])


def test_folder_of_sets(tmp_path):
    make_mvtec(tmp_path / "mpdd", "metal_plate")
    make_mvtec(tmp_path / "ksdd", "commutator", masks=False)
    make_mvtec(tmp_path / "other", "metal_plate", n_train=2)
    cats = discover_categories(tmp_path)
    assert [c.name for c in cats] == ["commutator", "mpdd/metal_plate", "other/metal_plate"]
    assert cats[1].object_name == "metal plate" and len(cats[2].train_paths) == 2
    assert [c.name for c in discover_categories(tmp_path, ["commutator"])] == ["commutator"]


def test_not_mvtec_layout_errors(tmp_path):
    (tmp_path / "images").mkdir()
    Image.fromarray(textured(0)).save(tmp_path / "images" / "a.png")
    with pytest.raises(DatasetLayoutError, match="MVTec AD layout"):
        discover_categories(tmp_path)
    with pytest.raises(DatasetLayoutError, match="no such folder"):
        discover_categories(tmp_path / "nope")
    with pytest.raises(DatasetLayoutError, match="no test"):
        load_category(tmp_path / "images")
    assert issubclass(DatasetLayoutError, VladError)


def test_missing_mask_means_no_pixel_metrics(tmp_path):
    cat_dir = make_mvtec(tmp_path)
    (cat_dir / "ground_truth" / "scratch" / "001_mask.png").unlink()
    cat = load_category(cat_dir)
    assert not cat.has_masks and len(cat.missing_masks) == 1


def test_draws_are_seeded_and_checked(tmp_path):
    cat = load_category(make_mvtec(tmp_path, n_train=8))
    a = draw_references(cat, 3, seed=0)
    assert a == draw_references(cat, 3, seed=0)
    assert len(set(a)) == 3 and all(p in cat.train_paths for p in a)
    draws = {tuple(draw_references(cat, 3, seed=s)) for s in range(6)}
    assert len(draws) > 1  # different seeds give different draws
    assert draw_references(cat, 0, seed=1) == []
    assert draw_references(cat, "all") == list(cat.train_paths)
    assert draw_references(cat, 8, seed=3) == list(cat.train_paths)
    with pytest.raises(DatasetLayoutError, match="only 8"):
        draw_references(cat, 9, seed=0)
    with pytest.raises(DatasetLayoutError, match="non-negative"):
        draw_references(cat, -1)


def test_limit_keeps_both_classes(tmp_path):
    cat = load_category(make_mvtec(tmp_path, n_good=6, n_bad=6))
    small = cat.limited(4)
    assert small.n_test == 4 and set(small.labels.tolist()) == {0, 1}
    assert small.limited(10) is small
