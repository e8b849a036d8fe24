"""ONNX export and the torch-free runtime: onnxruntime output equals torch's (1e-4), labels equal.

One detector holding every exportable scorer (tiny twins) is fitted and exported once per module; each
scorer's raw output from :mod:`vlad.runtime` is compared with the scorer's own ``predict``, the fused
result with the detector's, and the runtime is run once more in a subprocess where importing torch
fails, asserting that torch was never imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vlad
from conftest import assert_close_to_torch as _close
from conftest import fails_with_one_line, textured, with_defect
from vlad.cli import main
from vlad.errors import ExportError, IntegrityError
from vlad.images import load_images

ROOT = Path(__file__).resolve().parents[1]
EXPORTABLE = ("patchcore", "anomalydino", "padim", "efficientad", "winclip")
TOL = 1e-4

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """Three test images as files: one with a defect, two normal."""
    folder = tmp_path_factory.mktemp("test_images")
    paths = []
    for i, arr in enumerate([with_defect(textured(10)), textured(11), textured(12)]):
        paths.append(folder / f"img{i}.png")
        Image.fromarray(arr).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def exported(tmp_path_factory, one_thread):
    """(detector, export folder): every exportable scorer, tiny twins, 6 references."""
    det = vlad.create_detector(
        "+".join(EXPORTABLE), weights="tiny",
        scorer_options={"anomalydino": {"rotations": 2}, "efficientad": {"train_steps": 3}},
    )
    det.fit([textured(i) for i in range(6)])
    assert all(det.active_.values())
    folder = det.export(tmp_path_factory.mktemp("export"), format="onnx")
    return det, folder


@pytest.fixture(scope="module")
def runtime_det(exported):
    from vlad import runtime

    return runtime.load(exported[1])


@pytest.mark.parametrize("name", EXPORTABLE)
def test_each_scorer_equals_torch(exported, runtime_det, images, name):
    det, _ = exported
    loaded = load_images(images)
    want = det.scorers[name].predict(loaded)
    got = runtime_det.scorers[name].predict(loaded)  # 3 images: not the batch size the graph was traced with
    _close(got.image_scores, want.image_scores, f"{name} scores")
    _close(got.anomaly_maps, want.anomaly_maps, f"{name} maps")
    assert set(got.components) == set(want.components)
    for part in want.components:
        _close(got.components[part].image_scores, want.components[part].image_scores, f"{name}/{part} scores")
        _close(got.components[part].anomaly_maps, want.components[part].anomaly_maps, f"{name}/{part} maps")
    one = runtime_det.scorers[name].predict(loaded[:1])  # batch of one
    _close(one.image_scores, want.image_scores[:1], f"{name} score, batch of one")


def test_winclip_exported_with_its_few_shot_parts(runtime_det):
    assert runtime_det.scorers["winclip"].parts == ["zero_shot", "few_shot"]


def test_fused_detector_round_trip(exported, runtime_det, images):
    det, _ = exported
    want = det.predict(images)
    got = runtime_det.predict(images)
    _close(got.image_scores, want.image_scores, "fused scores")
    _close(got.anomaly_maps, want.anomaly_maps, "fused maps")
    np.testing.assert_array_equal(got.labels, want.labels)
    clear = np.abs(want.anomaly_maps - det.pixel_threshold) > TOL  # pixels not on the threshold itself
    np.testing.assert_array_equal(got.masks[clear], want.masks[clear])
    assert set(got.components) == set(EXPORTABLE)
    for name in EXPORTABLE:
        _close(got.components[name].image_scores, want.components[name].image_scores, f"calibrated {name}")
    assert runtime_det.image_threshold == pytest.approx(det.image_threshold)
    assert runtime_det.fusion_weights == pytest.approx(det.fusion_weights)
    assert got.names == tuple(str(p) for p in images)


def test_runtime_never_imports_torch(exported, images, tmp_path):
    det, folder = exported
    out = tmp_path / "runtime.npz"
    script = textwrap.dedent(f"""
        import sys
        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
        sys.meta_path.insert(0, NoTorch())
        import numpy as np
        from vlad import runtime
        res = runtime.load({str(folder)!r}).predict({[str(p) for p in images]!r})
        assert "torch" not in sys.modules, "vlad.runtime imported torch"
        np.savez({str(out)!r}, scores=res.image_scores, maps=res.anomaly_maps, labels=res.labels)
        print("ok", sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "sklearn", "scipy", "timm")))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok []", proc.stdout
    got = np.load(out)
    want = det.predict(images)
    _close(got["scores"], want.image_scores, "fused scores (subprocess)")
    _close(got["maps"], want.anomaly_maps, "fused maps (subprocess)")
    np.testing.assert_array_equal(got["labels"], want.labels)


def test_manifest_records_fusion_calibration_and_thresholds(exported):
    det, folder = exported
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["fusion"]["rule"] == det.options["fusion"]
    assert set(manifest["scorers"]) == set(EXPORTABLE)
    assert set(manifest["scorers"]["winclip"]["normalisers"]) == {"winclip/zero_shot", "winclip/few_shot"}
    assert manifest["thresholds"]["image"] == pytest.approx(det.image_threshold)
    assert sorted(manifest["sha256"]) == sorted(f"{n}.onnx" for n in EXPORTABLE)


def test_anomalydino_refuses_an_image_of_another_aspect(runtime_det):
    with pytest.raises(ExportError, match="export again for this image size"):
        runtime_det.predict([textured(3, size=96)[:, :80]])  # 96x80: another resized shape than 96x96


def test_tampered_graph_is_refused(exported, tmp_path):
    import shutil

    from vlad import runtime

    copy = Path(shutil.copytree(exported[1], tmp_path / "copy"))
    data = bytearray((copy / "padim.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "padim.onnx").write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        runtime.load(copy)


# -- scorers that cannot export ----------------------------------------------------------------
def test_non_exportable_scorer_says_which_and_why(tmp_path):
    det = vlad.create_detector("maeday", weights="tiny", scorer_options={"maeday": {"n_masks": 2}}).fit()
    with pytest.raises(ExportError, match=r"'maeday'.*cannot be exported to ONNX.*random masks"):
        det.export(tmp_path / "out")
    assert not (tmp_path / "out").exists()  # every graph is checked before anything is written


def test_anomalydino_with_masking_cannot_export(tmp_path):
    det = vlad.create_detector("anomalydino", weights="tiny", scorer_options={"anomalydino": {"rotations": 1, "masking": True}})
    det.fit([textured(0), textured(1)])
    with pytest.raises(ExportError, match="masking"):
        det.export(tmp_path / "out")


def test_a_tiling_detector_is_refused_rather_than_exported_without_its_tiles(tmp_path):
    det = vlad.create_detector("patchcore", weights="tiny", tile_size=48).fit([textured(0), textured(1)])
    with pytest.raises(ExportError, match="tile_size=48"):
        det.export(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_format_and_unfitted_detector(tmp_path):
    det = vlad.create_detector("patchcore", weights="tiny")
    with pytest.raises(vlad.NotFittedError):
        det.export(tmp_path / "a")
    det.fit([textured(0)])
    with pytest.raises(ExportError, match="format"):
        det.export(tmp_path / "b", format="tflite")


# -- command line ----------------------------------------------------------------------------------
def test_cli_export_then_runtime(tmp_path, capsys):
    det = vlad.create_detector("patchcore", weights="tiny").fit([textured(0), textured(1), textured(2)])
    det.save(tmp_path / "det")
    code = main(["export", str(tmp_path / "det"), "--format", "onnx", "--out", str(tmp_path / "onnx")])
    assert code == 0, capsys.readouterr().err
    assert "patchcore.onnx" in capsys.readouterr().out
    from vlad import runtime

    odd = [with_defect(textured(5, size=120)), textured(6, size=80)]  # other sizes than the references
    exported = runtime.load(tmp_path / "onnx")
    want, got = det.scorers["patchcore"].predict(odd), exported.predict_raw(odd)["patchcore"]
    assert [m.shape for m in got.map_list()] == [(120, 120), (80, 80)]
    _close(got.image_scores, want.image_scores, "cli export scores")
    for a, b in zip(got.map_list(), want.map_list()):
        _close(a, b, "cli export maps")
    np.testing.assert_array_equal(exported.predict(odd).labels, det.predict(odd).labels)


def test_cli_export_bad_input(tmp_path, capsys):
    fails_with_one_line(capsys, ["export", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], "not a folder")
    scorer_dir = tmp_path / "scorer"
    vlad.create_scorer("patchcore", weights="tiny").fit([textured(0)]).save(scorer_dir)
    fails_with_one_line(capsys, ["export", str(scorer_dir), "--out", str(tmp_path / "o")], "detector.json", "one scorer")
    det_dir = tmp_path / "det"
    vlad.create_detector("maeday", weights="tiny", scorer_options={"maeday": {"n_masks": 2}}).fit().save(det_dir)
    fails_with_one_line(capsys, ["export", str(det_dir), "--out", str(tmp_path / "o")], "maeday", "cannot be exported")
    (tmp_path / "file").write_text("x")
    fails_with_one_line(capsys, ["export", str(det_dir), "--out", str(tmp_path / "file")], "existing file")
    fails_with_one_line(capsys, ["export", str(det_dir), "--out", str(tmp_path / "o"), "--format", "tflite"], "format")
    fails_with_one_line(capsys, ["export", str(det_dir), "--out", str(tmp_path / "o"), "--image-size", "0", "5"],
                         "image-size")


# -- the numpy resampling equals torch's ------------------------------------------------------------
@pytest.mark.parametrize("src,dst,mode", [((96, 96), (224, 224), "bicubic"), ((500, 700), (448, 630), "bicubic"),
                                          ((300, 250), (256, 256), "bilinear"), ((64, 64), (64, 64), "bicubic")])
def test_numpy_resize_equals_torch(src, dst, mode):
    from vlad.ops import to_batch
    from vlad.runtime.imaging import resize_image

    img = load_images(np.random.default_rng(0).random((*src, 3)).astype(np.float32))
    want = to_batch(img, dst, None, None, interpolation=mode)[0].numpy()
    np.testing.assert_allclose(resize_image(img[0].pixels, dst, mode), want, atol=2e-6)


def test_numpy_map_resize_and_blur_equal_torch():
    from vlad.ops import gaussian_blur, resize_maps
    from vlad.runtime import imaging

    rng = np.random.default_rng(1)
    for (h, w), size in [((28, 28), (96, 120)), ((224, 224), (90, 70)), ((6, 6), (224, 224))]:
        m = rng.random((h, w)).astype(np.float32)
        want = resize_maps(torch.from_numpy(m)[None], size)[0].numpy()
        np.testing.assert_allclose(imaging.resize_map(m, size), want, atol=2e-6)
    for sigma, shape in [(4.0, (224, 224)), (4.0, (20, 20)), (2.0, (96, 100))]:
        m = rng.random(shape).astype(np.float32)
        np.testing.assert_allclose(imaging.gaussian_blur(m, sigma), gaussian_blur(torch.from_numpy(m)[None], sigma)[0].numpy(),
                                   atol=1e-6)
