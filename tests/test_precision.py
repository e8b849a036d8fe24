"""``precision="fp32" | "bf16" | "fp16"``: autocast of the pretrained-backbone forwards, everything after them
in float32 (:mod:`vlad.precision`).

Checked through the public API with the tiny random-init twins, on the smooth textures of ``conftest``:

* every scorer built on a pretrained backbone takes ``precision``; ``"fp32"`` gives exactly the results of
  the default (no autocast at all); ``"bf16"`` runs on the CPU, changes the numbers (so autocast took
  effect), returns float32 finite scores and maps, and still ranks every defect image above every normal
  one, as fp32 does;
* a bad value is a :class:`vlad.VladError` at ``fit`` (not at construction: scikit-learn's rule) naming the
  parameter, the value and the accepted values; a dtype torch cannot autocast to on the device says which
  precision to use instead;
* the detector routes ``precision`` to every scorer that has it, saved scorers and detectors keep it, and
  loading may replace it (as ``device``);
* ``vlad score`` / ``vlad eval`` take ``--precision`` and refuse a bad value with one ``vlad: error:`` line.

The tests marked ``gpu`` run the same ranking checks with bf16 and fp16 on CUDA; they are skipped where
``torch.cuda.is_available()`` is False (the hook in ``conftest.py``).
"""

from __future__ import annotations

import functools
import inspect
import warnings
from unittest import mock

import numpy as np
import pytest
from conftest import fails_with_one_line, textured, with_defect
from test_contract import SETTINGS as CONTRACT_SETTINGS
from PIL import Image

import vlad
from vlad.registry import get_scorer_class, parameter_names

#: the built-in scorers whose backbone has pretrained weights (``weights`` defaults to "pretrained")
PRETRAINED = sorted(
    name for name in vlad.list_scorers()
    if not get_scorer_class(name).__module__.split(".")[-1].startswith("test_")
    and inspect.signature(get_scorer_class(name).__init__).parameters.get("weights") is not None
    and inspect.signature(get_scorer_class(name).__init__).parameters["weights"].default == "pretrained"
)

#: the contract test's small budgets (all with weights="tiny"), for the pretrained-backbone scorers
SETTINGS: dict[str, dict] = {name: CONTRACT_SETTINGS[name] for name in PRETRAINED if name in CONTRACT_SETTINGS}

N_NORMAL = 4
pytestmark = pytest.mark.usefixtures("one_thread")


def references() -> list[np.ndarray]:
    return [textured(i) for i in range(4)]


def probe_images() -> list[np.ndarray]:
    """Four held-out normal textures, then two with an obvious square defect."""
    normals = [textured(i) for i in range(20, 20 + N_NORMAL)]
    return normals + [with_defect(textured(100)), with_defect(textured(101), box=(50, 70, 20, 40))]


def make(name: str, device: str = "cpu", **params):
    return vlad.create_scorer(name, weights="tiny", device=device, **{**SETTINGS[name], **params})


def warm_probes(device: str = "cpu") -> None:
    """Run vlad's one-off autocast probes now (cached per device and dtype), so that an autocast spy
    installed afterwards sees only the contexts of the backbone forwards."""
    from vlad.precision import check_precision

    for p in ("bf16", "fp16"):
        check_precision(p, device)


#: (name, precision) -> dtypes of every torch.autocast entered while :func:`result` fitted and predicted
AUTOCASTS: dict[tuple[str, str | None], list] = {}


@functools.lru_cache(maxsize=None)
def result(name: str, precision: str | None):
    """``name`` fitted and run on the probe images at ``precision`` (None: the default), on the CPU; the
    autocast contexts entered are recorded in :data:`AUTOCASTS`."""
    import torch

    params = {} if precision is None else {"precision": precision}
    warm_probes()
    seen = AUTOCASTS.setdefault((name, precision), [])
    real = torch.autocast

    def spy(device_type, dtype=None, **kwargs):
        seen.append(dtype)
        return real(device_type, dtype=dtype, **kwargs)

    with mock.patch.object(torch, "autocast", spy):
        return make(name, **params).fit(references()).predict(probe_images())


def assert_ranks_defects_first(res, what: str) -> None:
    scores = res.image_scores
    assert scores[N_NORMAL:].min() > scores[:N_NORMAL].max(), (
        f"{what}: defect scores {scores[N_NORMAL:]} not all above the normal ones {scores[:N_NORMAL]}")


def assert_float32_finite(res, what: str) -> None:
    assert res.image_scores.dtype == np.float32 and np.isfinite(res.image_scores).all(), what
    for m in res.map_list():
        assert m.dtype == np.float32 and np.isfinite(m).all(), what


# -- which scorers -------------------------------------------------------------------------------------
def test_every_pretrained_backbone_scorer_takes_precision():
    assert set(PRETRAINED) == set(SETTINGS)  # the list above is complete (and this test can see them)
    for name in PRETRAINED:
        cls = get_scorer_class(name)
        assert "precision" in parameter_names(cls), f"{name} has a pretrained backbone but no precision"
        assert inspect.signature(cls.__init__).parameters["precision"].default == "fp32"
    for name in ("autoencoder", "draem"):  # trained from scratch: nothing pretrained to autocast
        assert "precision" not in parameter_names(get_scorer_class(name))


# -- fp32 and bf16 on the CPU ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", PRETRAINED)
def test_fp32_equals_the_default_exactly(name):
    """fp32 is today's behaviour: no autocast context is ever entered (so nothing can differ from before
    the option existed), and the results equal the default's bit for bit."""
    default, fp32 = result(name, None), result(name, "fp32")
    assert AUTOCASTS[(name, None)] == [] and AUTOCASTS[(name, "fp32")] == []
    np.testing.assert_array_equal(fp32.image_scores, default.image_scores)
    for a, b in zip(fp32.map_list(), default.map_list(), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", PRETRAINED)
def test_bf16_on_cpu_is_float32_finite_and_keeps_the_ranking(name):
    import torch

    fp32, bf16 = result(name, "fp32"), result(name, "bf16")
    assert AUTOCASTS[(name, "bf16")] and set(AUTOCASTS[(name, "bf16")]) == {torch.bfloat16}
    assert_float32_finite(bf16, f"{name} bf16")
    assert_ranks_defects_first(fp32, f"{name} fp32")  # the fixture is fair
    assert_ranks_defects_first(bf16, f"{name} bf16")
    # autocast took effect: bfloat16 keeps 8 bits of mantissa, so the numbers move
    moved = not np.array_equal(bf16.image_scores, fp32.image_scores) or any(
        not np.array_equal(a, b) for a, b in zip(bf16.map_list(), fp32.map_list()))
    assert moved, f"{name}: bf16 gave exactly the fp32 results; the backbone did not run under autocast"


@pytest.mark.parametrize("name", ["anomalydino", "patchcore", "winclip"])
def test_fp16_on_cpu_runs_with_this_torch(name):
    res = result(name, "fp16")
    assert_float32_finite(res, f"{name} fp16")
    assert_ranks_defects_first(res, f"{name} fp16")


@pytest.mark.parametrize("name", ["anomalydino", "patchcore"])
def test_the_backbone_outputs_are_cast_to_float32_before_the_search(monkeypatch, name):
    """The kNN search sees float32 queries under bf16 (the search itself is never autocast)."""
    from vlad.memory import KnnIndex

    seen = []
    search = KnnIndex.search

    def spy(self, queries, *args, **kwargs):
        seen.append(queries.dtype)
        return search(self, queries, *args, **kwargs)

    monkeypatch.setattr(KnnIndex, "search", spy)
    make(name, precision="bf16").fit(references()[:1]).predict([textured(30)])
    import torch

    assert seen and set(seen) == {torch.float32}


# -- validation -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PRETRAINED)
@pytest.mark.parametrize("bad", ["fp8", "BF16", "bfloat16", None, 16])
def test_bad_precision_is_refused_where_it_enters_naming_the_parameter(name, bad):
    with pytest.raises(vlad.InvalidParameterError) as err:  # construction checks (without modifying)
        make(name, precision=bad)
    for msg in (str(err.value),):
        assert "precision" in msg and repr(bad) in msg
        assert all(repr(p) in msg for p in ("fp32", "bf16", "fp16")), msg
    scorer = make(name)
    scorer.precision = bad  # assigned as an attribute, past the checks at construction and set_params
    with pytest.raises(vlad.InvalidParameterError) as err:
        scorer.fit(references()[:2])
    msg = str(err.value)
    assert "precision" in msg and repr(bad) in msg
    assert all(repr(p) in msg for p in ("fp32", "bf16", "fp16")), msg
    assert not hasattr(scorer, "n_references_")  # refused before any work


def test_an_unsupported_combination_says_which_precision_to_use(monkeypatch):
    """A torch that cannot autocast to float16 on the CPU (torch before 2.4 warns and disables it) makes
    fp16 an error at fit that names bf16 instead, not a silent fp32 run nor a failure inside torch."""
    import contextlib

    import torch

    from vlad import precision

    real = torch.autocast

    def old_cpu_autocast(device_type, dtype=None, **kwargs):
        if device_type == "cpu" and dtype == torch.float16:
            warnings.warn("In CPU autocast, but the target dtype is not supported. Disabling autocast.")
            return contextlib.nullcontext()
        return real(device_type, dtype=dtype, **kwargs)

    precision._autocast_failure.cache_clear()
    monkeypatch.setattr(torch, "autocast", old_cpu_autocast)
    try:
        with pytest.raises(vlad.InvalidParameterError, match=r"precision='fp16'.*use precision='bf16'"):
            make("patchcore", precision="fp16").fit(references()[:1])
        make("patchcore", precision="bf16").fit(references()[:1])  # the suggestion works
    finally:
        precision._autocast_failure.cache_clear()


# -- detector, saving and loading -----------------------------------------------------------------------
def test_detector_routes_precision_to_every_scorer():
    det = vlad.create_detector("winclip+maeday+anomalydino+patchcore+autoencoder", weights="tiny",
                               precision="bf16")
    assert {n: getattr(s, "precision", None) for n, s in det.scorers.items()} == {
        "winclip": "bf16", "maeday": "bf16", "anomalydino": "bf16", "patchcore": "bf16", "autoencoder": None}
    assert det.get_params()["precision"] == "bf16"
    # a shared option like device: a detector without any scorer that takes it accepts it
    assert not hasattr(vlad.create_detector("autoencoder", precision="bf16").scorers["autoencoder"], "precision")
    # one scorer's own value wins over the shared one
    det = vlad.create_detector("winclip+anomalydino", weights="tiny", precision="bf16",
                               scorer_options={"winclip": {"precision": "fp32"}})
    assert det.scorers["winclip"].precision == "fp32" and det.scorers["anomalydino"].precision == "bf16"


def test_detector_refuses_a_bad_precision_before_any_fit():
    with pytest.raises(vlad.InvalidParameterError) as err:
        vlad.create_detector(weights="tiny", precision="fp12")
    assert all(word in str(err.value) for word in ("precision", "'fp12'", "'fp32', 'bf16', 'fp16'")), err.value


def test_default_detector_in_bf16_keeps_the_ranking():
    imgs = probe_images()
    res = {}
    for p in ("fp32", "bf16"):
        det = vlad.create_detector(weights="tiny", object_name="gear", precision=p,
                                   scorer_options={"maeday": {"n_masks": 8}, "anomalydino": {"rotations": 1}})
        res[p] = det.fit(references()).predict(imgs)
        assert_float32_finite(res[p], f"detector {p}")
        assert_ranks_defects_first(res[p], f"detector {p}")
        for name, comp in res[p].components.items():
            assert_float32_finite(comp, f"detector {p}: {name}")
    assert not np.array_equal(res["bf16"].image_scores, res["fp32"].image_scores)


def test_saved_scorer_keeps_precision_and_load_may_replace_it(tmp_path):
    scorer = make("anomalydino", precision="bf16").fit(references())
    before = scorer.predict(probe_images())
    folder = scorer.save(tmp_path / "dino")
    loaded = vlad.load(folder)
    assert loaded.precision == "bf16"
    np.testing.assert_array_equal(loaded.predict(probe_images()).image_scores, before.image_scores)
    as_fp32 = vlad.load(folder, precision="fp32")
    assert as_fp32.precision == "fp32"
    res = as_fp32.predict(probe_images())
    assert_ranks_defects_first(res, "loaded as fp32")
    assert not np.array_equal(res.image_scores, before.image_scores)  # the forwards now run in float32
    with pytest.raises(vlad.InvalidParameterError, match="precision"):
        vlad.load(folder, precision="half")


def test_saved_detector_keeps_precision_and_load_may_replace_it(tmp_path):
    from vlad.detector import Detector

    det = vlad.create_detector("winclip+anomalydino+patchcore", weights="tiny", object_name="gear",
                               precision="bf16", scorer_options={"anomalydino": {"rotations": 1}})
    det.fit(references()[:1])  # one reference: few-shot scorers active
    folder = det.save(tmp_path / "det")
    again = vlad.load(folder)
    assert {s.precision for s in again.scorers.values()} == {"bf16"}
    swapped = Detector.load(folder, precision="fp32")
    assert {s.precision for s in swapped.scorers.values()} == {"fp32"}
    unfitted_few = vlad.create_detector("winclip+patchcore", weights="tiny", precision="bf16").fit()
    folder2 = unfitted_few.save(tmp_path / "det2")  # patchcore inactive: saved as parameters
    assert vlad.load(folder2, precision="fp16").scorers["patchcore"].precision == "fp16"


# -- command line ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prec")
    (folder / "good").mkdir()
    (folder / "test").mkdir()
    for i, img in enumerate(references()[:2]):
        Image.fromarray(img).save(folder / "good" / f"g{i}.png")
    Image.fromarray(probe_images()[-1]).save(folder / "test" / "defect.png")
    return folder


def _spy_autocast(monkeypatch) -> list:
    """Record the dtype of every torch.autocast entered (the forwards run as usual)."""
    import torch

    warm_probes()
    real, seen = torch.autocast, []

    def spy(device_type, dtype=None, **kwargs):
        seen.append(dtype)
        return real(device_type, dtype=dtype, **kwargs)

    monkeypatch.setattr(torch, "autocast", spy)
    return seen


def test_cli_score_precision_reaches_the_forwards(capsys, monkeypatch, image_dir, tmp_path):
    import torch

    from vlad.cli import main

    seen = _spy_autocast(monkeypatch)
    argv = ["score", str(image_dir / "test"), "--scorer", "patchcore", "--weights", "tiny", "--device", "cpu",
            "--refs", str(image_dir / "good")]
    assert main([*argv, "--precision", "bf16"]) == 0, capsys.readouterr().err
    assert torch.bfloat16 in seen and torch.float16 not in seen
    seen.clear()
    assert main(argv) == 0  # no flag: fp32, no autocast at all
    assert seen == []
    # a saved detector with --load: --precision replaces the saved one
    vlad.create_detector("patchcore", weights="tiny").fit(references()[:2]).save(tmp_path / "saved")
    assert main(["score", str(image_dir / "test"), "--load", str(tmp_path / "saved"), "--device", "cpu",
                 "--precision", "fp16"]) == 0, capsys.readouterr().err
    assert seen and set(seen) == {torch.float16}


def test_cli_refuses_a_bad_precision_in_one_line(capsys, image_dir):
    base = ["score", str(image_dir / "test"), "--scorer", "patchcore", "--weights", "tiny",
            "--refs", str(image_dir / "good")]
    fails_with_one_line(capsys, [*base, "--precision", "fp8"], "--precision", "fp8", "bf16")
    fails_with_one_line(capsys, [*base, "--set", "precision=fp8"], "precision", "fp8", "bf16")
    fails_with_one_line(capsys, ["eval", str(image_dir), "--precision", "half"], "--precision", "half", "fp16")


def test_cli_eval_takes_precision(capsys, monkeypatch, tmp_path):
    """``vlad eval --precision bf16`` reaches the forwards (a one-category MVTec-layout set)."""
    import torch

    from vlad.cli import main

    cat = tmp_path / "data" / "plate"
    for sub in ("train/good", "test/good", "test/dent", "ground_truth/dent"):
        (cat / sub).mkdir(parents=True)
    for i, img in enumerate(references()):
        Image.fromarray(img).save(cat / "train" / "good" / f"{i:03d}.png")
    imgs = probe_images()
    for i, img in enumerate(imgs[:2]):
        Image.fromarray(img).save(cat / "test" / "good" / f"{i:03d}.png")
    for i, img in enumerate(imgs[N_NORMAL:]):
        Image.fromarray(img).save(cat / "test" / "dent" / f"{i:03d}.png")
        mask = (np.abs(img.astype(int) - textured(100 + i).astype(int)).sum(-1) > 0).astype(np.uint8) * 255
        Image.fromarray(mask).save(cat / "ground_truth" / "dent" / f"{i:03d}_mask.png")
    seen = _spy_autocast(monkeypatch)
    code = main(["eval", str(tmp_path / "data"), "--scorer", "patchcore", "--shots", "2", "--weights", "tiny",
                 "--device", "cpu", "--precision", "bf16"])
    assert code == 0, capsys.readouterr().err
    assert seen and set(seen) == {torch.bfloat16}


# -- on a CUDA GPU (skipped elsewhere) -------------------------------------------------------------------
def _cuda_result(name: str, precision: str):
    return make(name, device="cuda", precision=precision).fit(references()).predict(probe_images())


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("name", PRETRAINED)
def test_gpu_reduced_precision_keeps_the_ranking(name, precision):
    import torch

    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        with pytest.raises(vlad.InvalidParameterError, match="use precision='fp16'"):
            make(name, device="cuda", precision="bf16").fit(references())
        pytest.skip("this GPU has no bfloat16: refused with a hint, as it should be")
    fp32 = _cuda_result(name, "fp32")
    low = _cuda_result(name, precision)
    assert_float32_finite(low, f"{name} {precision} on cuda")
    assert_ranks_defects_first(fp32, f"{name} fp32 on cuda")
    assert_ranks_defects_first(low, f"{name} {precision} on cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_gpu_default_detector_reduced_precision_keeps_the_ranking(precision):
    import torch

    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    det = vlad.create_detector(weights="tiny", object_name="gear", device="cuda", precision=precision)
    res = det.fit(references()).predict(probe_images())
    assert_float32_finite(res, f"detector {precision} on cuda")
    assert_ranks_defects_first(res, f"detector {precision} on cuda")
