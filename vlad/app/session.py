"""The app's session logic: plain functions over a :class:`DemoSession`, no Gradio.

Every UI event (:mod:`vlad.app.ui`) calls one function of this module (``build_detector``, ``inspect``,
``apply_prompts``, ``add_references``, ``remove_reference``, ``add_unlabeled``, ``bootstrap_references``,
``apply_thresholds``, ``load_prompt_file``,
``save_prompt_file``); they take and return plain values plus a :class:`DemoSession`, so tests drive them
without a browser. Errors come back as a readable status line, never as a stack trace. Models are built
with :func:`vlad.create_detector`, as by ``vlad score``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlad.errors import VladError
from vlad.images import LoadedImage, load_images
from vlad.types import AnomalyResult
from vlad.visualize import overlay

logger = logging.getLogger(__name__)

DEFAULT_SCORERS = ["winclip", "maeday", "anomalydino"]


def live_scorers() -> dict[str, list[str]]:
    """Scorers the app can run live, by tier, read from their declared capabilities: zero-tier scorers
    (work from the first image), unlabeled-tier ones (score images against each other or an unlabeled
    pool, no training) and incremental few-tier ones (references join without training)."""
    from vlad.registry import get_scorer_class, list_scorers

    out: dict[str, list[str]] = {"zero": [], "unlabeled": [], "few": []}
    for name in list_scorers():
        cls = get_scorer_class(name)
        if cls.tier in ("zero", "unlabeled") or cls.incremental:
            out[cls.tier].append(name)
    return out


@dataclass
class DemoSession:
    """What one browser session works on: the detector, the images shown and their last raw result."""

    detector: Any = None
    spec: str = ""
    images: list[LoadedImage] = field(default_factory=list)
    result: AnomalyResult | None = None
    image_threshold: float | None = None  # None: the detector's derived threshold
    pixel_threshold: float | None = None


def _message(exc: BaseException) -> str:
    if isinstance(exc, VladError):
        return f"⚠️ {exc}"
    logger.exception("demo event failed")
    return f"⚠️ {type(exc).__name__}: {exc}"


def _winclip(session: DemoSession):
    det = session.detector
    return None if det is None else det.scorers.get("winclip")


def _paths(files) -> list[str]:
    """Gradio file values (paths, tempfile wrappers or dicts) -> paths."""
    out = []
    for f in files or []:
        if isinstance(f, (str, os.PathLike)):
            out.append(str(f))
        elif isinstance(f, dict) and "path" in f:
            out.append(f["path"])
        elif hasattr(f, "name"):
            out.append(f.name)
    return out


# -- prompts as text ---------------------------------------------------------------------------------
def prompts_to_text(prompt_set) -> tuple[str, str, str]:
    """A PromptSet -> three newline-separated texts (normal states, anomalous states, templates)."""
    return ("\n".join(prompt_set.normal_states), "\n".join(prompt_set.anomalous_states),
            "\n".join(prompt_set.templates))


def text_to_prompts(normal: str, anomalous: str, templates: str) -> dict[str, list[str]]:
    """Three texts (one entry per line, blank lines ignored) -> a prompt dict for ``load_prompts``."""
    def lines(text: str) -> list[str]:
        return [ln.strip() for ln in (text or "").splitlines() if ln.strip()]

    return {"normal_states": lines(normal), "anomalous_states": lines(anomalous), "templates": lines(templates)}


def default_prompt_text(object_name: str | None = None) -> tuple[str, str, str]:
    """The shipped prompt ensemble (with any per-object file) as editable text."""
    from vlad.prompts import load_prompts

    return prompts_to_text(load_prompts(None, object_name))


def load_prompt_file(file) -> tuple[str, str, str, str]:
    """Read a prompt YAML (as in ``prompts/``) into the three text boxes; returns them plus a status."""
    from vlad.prompts import load_prompts

    paths = _paths([file]) if file else []
    if not paths:
        return (*default_prompt_text(), "⚠️ choose a YAML file first")
    try:
        prompt_set = load_prompts(paths[0])
    except Exception as exc:  # noqa: BLE001 - shown to the user
        return ("", "", "", _message(exc))
    return (*prompts_to_text(prompt_set), f"loaded prompts from {Path(paths[0]).name}")


def save_prompt_file(normal: str, anomalous: str, templates: str, folder: str | None = None) -> tuple[str | None, str]:
    """Write the edited prompts as a YAML file (loadable by ``--prompts`` and ``load_prompts``)."""
    import yaml

    from vlad.prompts import PromptSet

    try:
        data = text_to_prompts(normal, anomalous, templates)
        PromptSet.from_dict(data, source="the editor")  # validate before writing
    except Exception as exc:  # noqa: BLE001
        return None, _message(exc)
    folder = folder or tempfile.mkdtemp(prefix="vlad-prompts-")
    path = Path(folder) / "prompts.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return str(path), f"saved {path.name}"


# -- detector ----------------------------------------------------------------------------------------
def build_detector(scorers: list[str], object_name: str, weights: str, device: str,
                   prompts: dict | None = None) -> tuple[DemoSession, str]:
    """A new session with a fitted zero-shot detector (few-shot scorers join when references arrive)."""
    from vlad import create_detector

    session = DemoSession()
    try:
        if not scorers:
            raise VladError("choose at least one scorer")
        spec = "+".join(scorers)
        options: dict[str, Any] = {"weights": weights, "device": device}
        if object_name:
            options["object_name"] = object_name
        if prompts is not None and "winclip" in scorers:
            options["prompts"] = prompts
        det = create_detector(spec, **options)
        if det.requires_references:
            status = f"{spec}: add good reference images to start (every scorer here is few-shot)"
        else:
            det.fit()
            status = f"ready: {spec} on {device}, weights {weights}"
        session.detector, session.spec = det, spec
        return session, status
    except Exception as exc:  # noqa: BLE001
        return session, _message(exc)


def _ready(session: DemoSession) -> bool:
    return session.detector is not None and getattr(session.detector, "fitted_", False)


def _predict(session: DemoSession) -> None:
    session.result = session.detector.predict(session.images) if session.images and _ready(session) else None


def _thresholds(session: DemoSession) -> tuple[float, float]:
    det = session.detector
    image = session.image_threshold if session.image_threshold is not None else det.image_threshold
    pixel = session.pixel_threshold if session.pixel_threshold is not None else det.pixel_threshold
    return float(image), float(pixel)


def render(session: DemoSession) -> tuple[list, list, list[list], str]:
    """The current result as UI values: fused overlays, component overlays, score table rows, summary."""
    if session.result is None:
        return [], [], [], "no result yet: upload images and press Inspect"
    image_thr, pixel_thr = _thresholds(session)
    res = session.result.with_thresholds(image_thr, pixel_thr)
    fused, parts, rows = [], [], []
    for i, img in enumerate(session.images):
        amap = res.map_list()[i]
        label = "ANOMALOUS" if res.labels[i] else "good"
        name = Path(img.name).name
        shown = overlay(img.pixels, amap, vmin=0.0, vmax=max(1.0, float(amap.max())))
        mask = res.masks[i] if res.masks is not None else None
        if mask is not None and mask.any():
            shown = _outline(shown, mask)
        fused.append((shown, f"{name}: {res.image_scores[i]:.3f} {label}"))
        row = [name, round(float(res.image_scores[i]), 4), label]
        for comp_name, comp in res.components.items():
            parts.append((overlay(img.pixels, comp.map_list()[i]), f"{name} · {comp_name}: {comp.image_scores[i]:.3f}"))
            row.append(round(float(comp.image_scores[i]), 4))
        rows.append(row)
    summary = (f"{len(rows)} image(s) · {sum(r[2] == 'ANOMALOUS' for r in rows)} anomalous · image threshold "
               f"{image_thr:.3f} · pixel threshold {pixel_thr:.3f} · references: {len(session.detector.list_references())}"
               f"\n\n{_threshold_words(session)}")
    return fused, parts, rows, summary


#: the longest side, in pixels, of a picture the app sends to the browser (each is shown whole, scaled down)
SHOWN_SIDE = 640
#: small pictures are drawn at least this wide (scaled up, still whole)
MIN_SHOWN = 360


def _png_data_url(rgb: np.ndarray) -> str:
    import base64
    import io

    from PIL import Image

    img = Image.fromarray(np.asarray(rgb, dtype=np.uint8))
    if max(img.size) > SHOWN_SIDE:
        img.thumbnail((SHOWN_SIDE, SHOWN_SIDE), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def maps_html(items: list[tuple[np.ndarray, str]], images: list[np.ndarray] | None = None) -> str:
    """HTML that shows each ``(picture, caption)`` whole, at its own aspect ratio (no crop), with the
    matching image of ``images`` beside it when given. Pictures are sent as PNG data URLs."""
    from html import escape

    if not items:
        return "<p>no maps yet</p>"
    img_css = "flex:1 1 0;min-width:0;max-width:{w}px;width:100%;height:auto;display:block"
    out = ['<div class="vlad-maps">']
    for i, (pic, caption) in enumerate(items):
        pic = np.asarray(pic)
        cells = []
        if images is not None:
            src = np.asarray(images[i])
            cells.append(f'<img class="vlad-image" alt="image" src="{_png_data_url(src)}" '
                         f'style="{img_css.format(w=max(src.shape[1], MIN_SHOWN))}">')
        cells.append(f'<img class="vlad-map" alt="{escape(caption)}" src="{_png_data_url(pic)}" '
                     f'style="{img_css.format(w=max(pic.shape[1], MIN_SHOWN))}">')
        out.append('<figure style="margin:0 0 14px 0"><div style="display:flex;gap:8px;align-items:flex-start">'
                   f'{"".join(cells)}</div><figcaption>{escape(caption)}</figcaption></figure>')
    out.append("</div>")
    return "".join(out)


def _threshold_words(session: DemoSession) -> str:
    """What the thresholds in force promise, in a sentence (moved sliders promise nothing)."""
    if session.image_threshold is not None or session.pixel_threshold is not None:
        return "thresholds moved by hand: no false-alarm rate is guaranteed"
    return session.detector.threshold_info().describe()


def table_headers(session: DemoSession) -> list[str]:
    """Column names of the score table for the current result."""
    comps = list(session.result.components) if session.result is not None else []
    return ["image", "score", "label", *comps]


def _outline(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Draw the predicted-anomalous region's border in white."""
    from scipy.ndimage import binary_erosion

    border = mask & ~binary_erosion(mask, iterations=2)
    out = rgb.copy()
    out[border] = 255
    return out


def inspect(session: DemoSession, files) -> tuple[DemoSession, str]:
    """Score the uploaded images with the current detector."""
    try:
        if session.detector is None:
            raise VladError("build a detector first (choose scorers and press Build)")
        paths = _paths(files)
        if not paths:
            raise VladError("upload one or more images first")
        session.images = load_images(paths)
        if not _ready(session):
            raise VladError("this detector has only few-shot scorers: add good reference images first")
        _predict(session)
        return session, f"scored {len(session.images)} image(s)"
    except Exception as exc:  # noqa: BLE001
        return session, _message(exc)


def apply_prompts(session: DemoSession, object_name: str, normal: str, anomalous: str,
                  templates: str) -> tuple[DemoSession, str]:
    """Change WinCLIP's object name and prompts; only changed sentences are re-encoded; re-score."""
    try:
        winclip = _winclip(session)
        if winclip is None:
            raise VladError("prompts drive WinCLIP: include 'winclip' in the scorers and press Build")
        if not _ready(session):
            raise VladError("build the detector first")
        winclip.set_prompts(text_to_prompts(normal, anomalous, templates), object_name=object_name or None)
        session.detector.recalibrate()  # WinCLIP's scores changed: normalisers and thresholds follow
        stats = getattr(winclip, "text_stats_", None)
        _predict(session)
        detail = f" ({stats})" if stats else ""
        return session, f"prompts applied{detail}"
    except Exception as exc:  # noqa: BLE001
        return session, _message(exc)


def add_references(session: DemoSession, files) -> tuple[DemoSession, list[str], str]:
    """Add good reference images: the few-shot tier joins, normalisers and thresholds update; re-score."""
    try:
        det = session.detector
        if det is None:
            raise VladError("build a detector first")
        paths = _paths(files)
        if not paths:
            raise VladError("upload good reference images first")
        if _ready(session):
            det.add_references(paths)
        else:
            det.fit(paths)
        _predict(session)
        return session, det.list_references(), f"{len(paths)} reference(s) added; {len(det.list_references())} in all"
    except Exception as exc:  # noqa: BLE001
        refs = session.detector.list_references() if session.detector is not None else []
        return session, refs, _message(exc)


def add_unlabeled(session: DemoSession, files) -> tuple[DemoSession, str]:
    """Add unlabeled images of the line to the unlabeled tier's pool (needs musc); re-score."""
    try:
        det = session.detector
        if not _ready(session):
            raise VladError("build the detector first (with musc among the scorers)")
        paths = _paths(files)
        if not paths:
            raise VladError("upload unlabeled images of the line first")
        det.add_unlabeled(paths)
        _predict(session)
        return session, (f"{len(paths)} unlabeled image(s) added; pool: {len(det.list_unlabeled())}. "
                         f"{det.threshold_info().describe()}")
    except Exception as exc:  # noqa: BLE001
        return session, _message(exc)


def bootstrap_references(session: DemoSession, n: int | float | None) -> tuple[DemoSession, list[str], str]:
    """Pick the ``n`` pool images judged most normal as references; the status lists them with their
    scores (remove a pick with ``remove_reference``); re-score."""
    try:
        det = session.detector
        if not _ready(session):
            raise VladError("build the detector first (with musc among the scorers)")
        report = det.bootstrap_references(int(n or 0))
        _predict(session)
        return session, det.list_references(), report.describe().replace("\n", "  \n")
    except Exception as exc:  # noqa: BLE001
        refs = session.detector.list_references() if session.detector is not None else []
        return session, refs, _message(exc)


def remove_reference(session: DemoSession, name: str | None) -> tuple[DemoSession, list[str], str]:
    """Forget one reference (e.g. one that turned out defective); re-score."""
    try:
        det = session.detector
        if det is None or not name:
            raise VladError("choose a reference to remove")
        det.remove_reference(name)
        _predict(session)
        return session, det.list_references(), f"removed {Path(name).name}"
    except Exception as exc:  # noqa: BLE001
        refs = session.detector.list_references() if session.detector is not None else []
        return session, refs, _message(exc)


def apply_thresholds(session: DemoSession, image_threshold: float | None, pixel_threshold: float | None,
                     use_auto: bool = False) -> tuple[DemoSession, str]:
    """Move the thresholds (no model runs again); ``use_auto`` returns to the derived ones."""
    if use_auto:
        session.image_threshold = session.pixel_threshold = None
        return session, "thresholds derived from the references"
    session.image_threshold = None if image_threshold is None else float(image_threshold)
    session.pixel_threshold = None if pixel_threshold is None else float(pixel_threshold)
    return session, f"thresholds: image {session.image_threshold}, pixel {session.pixel_threshold}"
