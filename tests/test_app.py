"""The Gradio app's event functions, driven without a browser (tiny models)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import textured, with_defect
from vlad import app


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    paths = {}
    for i in range(3):
        paths[f"good{i}"] = folder / f"good{i}.png"
        Image.fromarray(textured(i)).save(paths[f"good{i}"])
    paths["bad"] = folder / "bad.png"
    Image.fromarray(with_defect(textured(9))).save(paths["bad"])
    paths["broken"] = folder / "broken.png"
    paths["broken"].write_bytes(b"not an image")
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="module")
def session():
    s, msg = app.build_detector(["winclip", "anomalydino"], "metal plate", "tiny", "cpu")
    assert msg.startswith("ready"), msg
    return s


def test_inspect_shows_fused_and_component_maps(session, image_files):
    s, msg = app.inspect(session, [image_files["bad"], image_files["good0"]])
    assert msg == "scored 2 image(s)"
    fused, parts, rows, summary = app.render(s)
    assert len(fused) == 2 and fused[0][0].shape == (96, 96, 3) and fused[0][0].dtype == np.uint8
    assert len(parts) == 2  # only winclip is active without references
    assert [r[0] for r in rows] == ["bad.png", "good0.png"] and rows[0][2] in ("good", "ANOMALOUS")
    assert "references: 0" in summary


def test_edit_prompt_recomputes_only_the_change(session, image_files):
    normal, anomalous, templates = app.default_prompt_text("metal plate")
    before = app.render(session)[2]
    winclip = session.detector.scorers["winclip"]
    known = set(sum(winclip.prompt_set_.expand("metal plate"), []))
    s, msg = app.apply_prompts(session, "metal plate", normal, anomalous + "\n{} with a purple zebra stripe", templates)
    assert msg.startswith("prompts applied"), msg
    stats = s.detector.scorers["winclip"].text_stats_
    now = set(sum(winclip.prompt_set_.expand("metal plate"), []))
    assert stats["reused"] == len(known) and len(now - known) == len(set(templates.splitlines()))
    assert stats["encoded"] <= len(now - known)  # only the new state's sentences (0 if cached earlier)
    assert app.render(s)[2] != before  # scores moved


def test_references_join_and_leave(session, image_files):
    s, refs, msg = app.add_references(session, [image_files["good1"], image_files["good2"]])
    assert len(refs) == 2, msg
    fused, parts, rows, summary = app.render(s)
    assert len(rows[0]) == 5 and "references: 2" in summary  # winclip + anomalydino columns
    s, refs, msg = app.remove_reference(s, refs[0])
    assert len(refs) == 1 and msg.startswith("removed")
    s, msg = app.apply_thresholds(s, 0.0, 0.99)
    assert all(r[2] == "ANOMALOUS" for r in app.render(s)[2])
    s, msg = app.apply_thresholds(s, None, None, use_auto=True)
    assert s.image_threshold is None


def test_errors_are_messages_not_tracebacks(session, image_files, tmp_path):
    s, msg = app.inspect(session, [image_files["broken"]])
    assert msg.startswith("⚠️") and "broken.png" in msg
    s, msg = app.inspect(app.DemoSession(), [image_files["bad"]])
    assert msg.startswith("⚠️") and "Build" in msg
    s, msg = app.apply_prompts(session, "metal plate", "no placeholder", "{} with flaw", "a photo of {}.")
    assert msg.startswith("⚠️")
    s, msg = app.build_detector(["winclip"], "x", "pretrained", "cpu")
    assert msg.startswith("⚠️") and "VLAD_WEIGHTS_DIR" in msg
    s, refs, msg = app.add_references(session, [])
    assert msg.startswith("⚠️")


def test_prompt_yaml_round_trip(tmp_path):
    normal, anomalous, templates = app.default_prompt_text()
    path, msg = app.save_prompt_file(normal + "\nshiny {}", anomalous, templates, folder=str(tmp_path))
    assert path and msg.startswith("saved")
    n2, a2, t2, msg = app.load_prompt_file(path)
    assert n2.splitlines()[-1] == "shiny {}" and a2 == anomalous and t2 == templates
    _, msg = app.save_prompt_file("missing placeholder", anomalous, templates, folder=str(tmp_path))
    assert msg.startswith("⚠️")


def test_maps_are_sent_whole_at_their_aspect_ratio():
    import base64
    import io
    import re

    from PIL import Image

    wide = np.zeros((100, 1000, 3), np.uint8)  # larger than the app sends: scaled down, never cropped
    html = app.maps_html([(wide, "w.png: 0.9 <ANOMALOUS>")], images=[wide])
    sources = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(sources) == 2 and 'class="vlad-image"' in html and 'class="vlad-map"' in html
    shown = Image.open(io.BytesIO(base64.b64decode(sources[1])))
    assert shown.size == (640, 64)  # the longest side capped, the shape kept
    assert "&lt;ANOMALOUS&gt;" in html  # captions are escaped
    assert app.maps_html([]) == "<p>no maps yet</p>"
