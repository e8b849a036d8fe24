"""The Gradio app: edit zero-shot prompts by looking, add good references live, move thresholds.

Every UI event calls one plain function of this module (``build_detector``, ``inspect``,
``apply_prompts``, ``add_references``, ``remove_reference``, ``apply_thresholds``, ``load_prompt_file``,
``save_prompt_file``); they take and return plain values plus a :class:`DemoSession`, so tests drive them
without a browser. Errors come back as a readable status line, never as a stack trace.

Start it with ``vlad demo`` or ``python demo/app.py`` (options: ``--weights random|tiny`` without
pretrained weights, ``--detector``, ``--object``, ``--host``, ``--port``).
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

ZERO_SHOT = ("winclip", "maeday")
FEW_SHOT = ("anomalydino", "patchcore")
DEFAULT_SCORERS = ["winclip", "maeday", "anomalydino"]


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
    from vlad.detector import create_detector

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
               f"{image_thr:.3f} · pixel threshold {pixel_thr:.3f} · references: {len(session.detector.list_references())}")
    return fused, parts, rows, summary


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


# -- the UI ------------------------------------------------------------------------------------------
def build_app(scorers: list[str] | None = None, object_name: str = "object", weights: str = "pretrained",
              device: str = "cpu"):
    """The Gradio Blocks app (not launched)."""
    import gradio as gr

    from vlad.registry import list_scorers

    scorers = scorers or list(DEFAULT_SCORERS)
    normal0, anomalous0, templates0 = default_prompt_text(object_name)
    available = [s for s in (*ZERO_SHOT, *FEW_SHOT) if s in list_scorers()]

    with gr.Blocks(title="vlad: zero- and few-shot inspection") as app:
        state = gr.State(None)
        gr.Markdown("## vlad · zero- and few-shot visual inspection\nName the product, upload images, "
                    "tune prompts by looking; add good images and the few-shot tier joins.")
        status = gr.Markdown("press **Build** to start", elem_id="status")
        with gr.Row():
            with gr.Column(scale=1):
                choose = gr.CheckboxGroup(available, value=[s for s in scorers if s in available], label="Scorers")
                obj = gr.Textbox(object_name, label="Object name", elem_id="object-name")
                with gr.Row():
                    weights_in = gr.Dropdown(["pretrained", "random", "tiny"], value=weights, label="Weights",
                                             allow_custom_value=True)
                    device_in = gr.Dropdown(["cpu", "cuda", "auto"], value=device, label="Device")
                build_btn = gr.Button("Build", variant="primary", elem_id="build")
                images_in = gr.File(file_count="multiple", file_types=["image"], label="Images to inspect",
                                    elem_id="images")
                inspect_btn = gr.Button("Inspect", variant="primary", elem_id="inspect")
                refs_in = gr.File(file_count="multiple", file_types=["image"], label="Good reference images",
                                  elem_id="refs")
                add_btn = gr.Button("Add references", elem_id="add-refs")
                refs_list = gr.Dropdown([], label="References", allow_custom_value=False)
                remove_btn = gr.Button("Remove selected reference")
                img_thr = gr.Slider(0, 1, value=0.5, step=0.01, label="Image threshold")
                pix_thr = gr.Slider(0, 1, value=0.5, step=0.01, label="Pixel threshold")
                with gr.Row():
                    thr_btn = gr.Button("Apply thresholds")
                    auto_btn = gr.Button("Derived thresholds")
            with gr.Column(scale=2):
                summary = gr.Markdown("", elem_id="summary")
                table = gr.Dataframe(headers=["image", "score", "label"], label="Scores", elem_id="scores",
                                     interactive=False)
                fused = gr.Gallery(label="Fused anomaly map", columns=3, height=360, object_fit="contain")
                parts = gr.Gallery(label="Each scorer's map", columns=4, height=300, object_fit="contain")
                with gr.Accordion("Prompts (WinCLIP)", open=True):
                    normal_in = gr.Textbox(normal0, lines=6, label="Normal states ({} = object)", elem_id="normal")
                    anomalous_in = gr.Textbox(anomalous0, lines=4, label="Anomalous states ({} = object)",
                                              elem_id="anomalous")
                    templates_in = gr.Textbox(templates0, lines=6, label="Templates ({} = state phrase)",
                                              elem_id="templates")
                    with gr.Row():
                        prompts_btn = gr.Button("Apply prompts", elem_id="apply-prompts")
                        prompt_file = gr.File(file_types=[".yaml", ".yml"], label="Load prompt YAML")
                        save_btn = gr.Button("Save prompts as YAML")
                    saved = gr.File(label="Saved prompts", interactive=False)

        def show(session):
            if session is None:
                return [], [], gr.update(value=[]), ""
            f, p, rows, text = render(session)
            return f, p, gr.update(value=rows, headers=table_headers(session)), text

        outputs = [fused, parts, table, summary]

        def on_build(chosen, name, w, dev, normal, anomalous, templates, progress=gr.Progress(track_tqdm=True)):
            prompts = text_to_prompts(normal, anomalous, templates)
            session, msg = build_detector(chosen, name, w, dev, prompts)
            return (session, msg, *show(session))

        def on_inspect(session, files, progress=gr.Progress(track_tqdm=True)):
            session, msg = inspect(session or DemoSession(), files)
            return (session, msg, *show(session))

        def on_prompts(session, name, normal, anomalous, templates, progress=gr.Progress(track_tqdm=True)):
            session, msg = apply_prompts(session or DemoSession(), name, normal, anomalous, templates)
            return (session, msg, *show(session))

        def on_add(session, files, progress=gr.Progress(track_tqdm=True)):
            session, refs, msg = add_references(session or DemoSession(), files)
            return (session, gr.update(choices=refs, value=None), msg, *show(session))

        def on_remove(session, name):
            session, refs, msg = remove_reference(session or DemoSession(), name)
            return (session, gr.update(choices=refs, value=None), msg, *show(session))

        def on_thresholds(session, i_thr, p_thr, auto=False):
            session, msg = apply_thresholds(session or DemoSession(), i_thr, p_thr, use_auto=auto)
            return (session, msg, *show(session))

        build_btn.click(on_build, [choose, obj, weights_in, device_in, normal_in, anomalous_in, templates_in],
                        [state, status, *outputs])
        inspect_btn.click(on_inspect, [state, images_in], [state, status, *outputs])
        prompts_btn.click(on_prompts, [state, obj, normal_in, anomalous_in, templates_in], [state, status, *outputs])
        add_btn.click(on_add, [state, refs_in], [state, refs_list, status, *outputs])
        remove_btn.click(on_remove, [state, refs_list], [state, refs_list, status, *outputs])
        thr_btn.click(on_thresholds, [state, img_thr, pix_thr], [state, status, *outputs])
        auto_btn.click(lambda s: on_thresholds(s, None, None, True), [state], [state, status, *outputs])
        prompt_file.upload(load_prompt_file, [prompt_file], [normal_in, anomalous_in, templates_in, status])
        save_btn.click(lambda n, a, t: save_prompt_file(n, a, t), [normal_in, anomalous_in, templates_in],
                       [saved, status])
    return app


def launch(host: str = "127.0.0.1", port: int = 7860, detector: str | None = None, object_name: str | None = None,
           weights: str = "pretrained", device: str = "cpu", block: bool = True):
    """Build and start the app on ``host:port`` (loopback by default)."""
    os.environ.setdefault("VLAD_PROGRESS", "1")  # tqdm bars feed Gradio's progress display
    scorers = detector.split("+") if detector else None
    app = build_app(scorers, object_name or "object", weights, device)
    app.queue().launch(server_name=host, server_port=port, prevent_thread_lock=not block, show_error=False)
    return app
