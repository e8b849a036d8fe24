"""Devices: the same ``random_state`` gives the same random draws, and the same model wherever the
arithmetic allows it, on every device; a detector saved on a GPU machine loads on one without a GPU.

On the CPU (always):

* every random draw made while a scorer is fitted and used comes from a CPU generator: either an explicit
  ``generator=`` on the CPU or the global CPU generator inside :func:`vlad.rng.seeded`, on a CPU tensor
  (:class:`RandomDraws` watches every torch call). A draw from the global generator outside ``seeded``
  would be unseeded, and on a GPU it would come from the GPU's generator;
* building a scorer for another device draws nothing there: ``_build`` for the ``meta`` device (a device
  every machine has, whose tensors hold no data) must make all its draws on CPU tensors before moving
  them. Re-initialising a module after moving it (STPM's student did, so CPU and CUDA trained different
  students) fails this check;
* a detector or scorer saved with ``device="cuda"`` loads on a machine without CUDA on the CPU, with one
  logged warning, and scores as the original; ``--device`` with ``--load`` on the command line.

On a GPU (``gpu`` marker, skipped elsewhere): every registered scorer fitted on the CPU and on CUDA with
the same ``random_state`` starts from the identical model and gives the same scores and maps within 1e-4
(relative to their largest magnitude), and a detector fitted and saved on CUDA scores the same loaded on
the CPU. TF32 is turned off for the comparison (cuDNN convolutions use it by default on CUDA: a precision
choice, not a random stream). DRAEM and STPM are compared with a training budget of zero steps: their
training amplifies rounding, so no two machines that add in different orders train the same model (on
this project's CPU, 1 and 2 torch threads already give DRAEM scores 1.5% apart after 3 steps and 30%
apart after 100; a 1e-6 relative change of STPM's initial weights moves its scores by 6% after 20 steps).
Their random streams are the same on every device (checked on the CPU above); their training is not.
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fails_with_one_line, textured
from test_contract import SCORERS, normal_test_images, references, settings, synthetic_defect
from torch.overrides import TorchFunctionMode

import vlad
from vlad import rng
from vlad.registry import get_scorer_class, parameter_names

#: Torch functions and methods that draw random numbers (``nn.init`` functions included).
RANDOM_OPS = frozenset({
    "rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like", "normal", "bernoulli",
    "multinomial", "poisson", "normal_", "uniform_", "bernoulli_", "random_", "exponential_", "geometric_",
    "log_normal_", "cauchy_", "kaiming_normal_", "kaiming_uniform_", "xavier_normal_", "xavier_uniform_",
    "trunc_normal_", "orthogonal_", "sparse_", "dropout", "dropout1d", "dropout2d", "dropout3d",
    "alpha_dropout", "feature_alpha_dropout", "rrelu", "scaled_dot_product_attention",
})

#: Trained scorers whose training amplifies rounding (module docstring): compared across devices with no
#: training steps, so that the comparison checks their initial model, streams and statistics.
ILL_CONDITIONED = {"draem": {"train_steps": 0}, "stpm": {"train_steps": 0}}

#: Scorers whose default search on a GPU is not float32 (MuSc's TF32 candidates, checked against float32
#: in tests/test_musc.py): compared in float32 here, which is what this file's bounds are about.
FLOAT32_SEARCH = {"musc": {"search_precision": "fp32"}}

#: CPU vs CUDA bound where float32 arithmetic alone moves a scorer further than 1e-4 (same weights, TF32
#: off), measured on an H200 on 2026-12-04: DRAEM untrained 9.8e-4 (its untrained network amplifies the
#: rounding of the convolutions); MuSc 4.1e-4 (the distance sqrt(2 - 2 cos) of near-identical unit rows
#: amplifies the rounding of the similarity products). Every other scorer: within 1e-4.
ARITHMETIC_BOUND = {"draem": 2e-3, "musc": 1e-3}

#: Scorers whose ``_build`` needs real tensors (not the data-less ``meta`` device).
NOT_BUILDABLE_ON_META = {"winclip": "computes its text prototypes with the model in _build"}


def _draws_randomness(name: str, args: tuple, kwargs: dict) -> bool:
    """False for the calls of :data:`RANDOM_OPS` that draw nothing (dropout off, attention without dropout)."""
    if name == "scaled_dot_product_attention":
        return float(kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0)) > 0
    if "dropout" in name or name == "rrelu":
        training = kwargs.get("training", kwargs.get("train", args[2] if len(args) > 2 else name == "rrelu"))
        p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
        return bool(training) and (name == "rrelu" or float(p) > 0)
    return True


def _caller() -> str:
    """The innermost frame in vlad's own code (where the draw was asked for)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/vlad/" in frame.filename.replace("\\", "/") and "/tests/" not in frame.filename:
            return f"{Path(frame.filename).name}:{frame.lineno} ({frame.name})"
    return "outside vlad"


class RandomDraws(TorchFunctionMode):
    """Records every random draw torch makes inside the block; ``bad`` lists those not made on the CPU
    from a CPU generator (an explicit one, or the global one inside :func:`vlad.rng.seeded`)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.bad: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name in RANDOM_OPS and _draws_randomness(name, args, kwargs):
            self.count += 1
            target = args[0] if name.endswith("_") and args and isinstance(args[0], torch.Tensor) else out
            gen = kwargs.get("generator")
            problem = None
            if isinstance(target, torch.Tensor) and target.device.type != "cpu":
                problem = f"draws on {target.device}"
            elif gen is not None and torch.device(gen.device).type != "cpu":
                problem = f"uses a generator on {gen.device}"
            elif gen is None and not rng.in_seeded_block():
                problem = "draws from the global generator outside vlad.rng.seeded"
            if problem:
                self.bad.append(f"{name} at {_caller()} {problem}")
        return out


def _params(name: str, device: str, **extra) -> dict:
    params = {**settings(name, quick=True), "device": device, **extra}
    if "random_state" in parameter_names(get_scorer_class(name)):
        params["random_state"] = 7
    return params


def _images() -> list[np.ndarray]:
    return normal_test_images()[:2] + [synthetic_defect(0)[0]]


# -- random streams on the CPU -------------------------------------------------------------------------

@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", SCORERS)
def test_every_random_draw_is_a_cpu_draw(name, device):
    scorer = vlad.create_scorer(name, **_params(name, device))
    with RandomDraws() as draws:
        scorer.fit(references())
        scorer.predict(_images()[:1])
    assert draws.count > 0  # at least the model's initialisation is seen
    assert not draws.bad, f"{name}: random draws that depend on the device or are unseeded:\n" + "\n".join(draws.bad)


@pytest.mark.parametrize("name", SCORERS)
def test_building_for_another_device_draws_nothing_there(name):
    if name in NOT_BUILDABLE_ON_META:
        pytest.skip(f"{name} {NOT_BUILDABLE_ON_META[name]}; its draws are checked by the test above")
    scorer = vlad.create_scorer(name, **_params(name, "cpu"))
    scorer.device_ = torch.device("meta")  # what fit() sets from `device`; meta tensors hold no data
    with RandomDraws() as draws:
        scorer._build()
    assert draws.count > 0
    assert not draws.bad, f"{name}: _build draws on the target device:\n" + "\n".join(draws.bad)


def test_rng_helpers_draw_on_the_cpu_and_leave_the_callers_state_alone():
    assert rng.cpu_generator(3).device.type == "cpu"
    expected = torch.rand(4, generator=rng.cpu_generator(3))
    torch.manual_seed(11)
    before = torch.rand(5)
    torch.manual_seed(11)
    with rng.seeded(3):
        assert rng.in_seeded_block()
        inside = torch.rand(4)
    assert not rng.in_seeded_block()
    assert torch.equal(inside, expected)  # the global CPU generator, seeded
    assert torch.equal(torch.rand(5), before)  # the caller's stream goes on as if nothing happened
    a = rng.init_module(lambda: torch.nn.Linear(3, 2), "cpu", 5)
    b = rng.init_module(lambda: torch.nn.Linear(3, 2), "meta", 5)
    assert b.weight.device.type == "meta"
    assert torch.equal(a.weight, rng.init_module(lambda: torch.nn.Linear(3, 2), "cpu", 5).weight)


# -- saved on a GPU machine, loaded on one without -------------------------------------------------------

def _as_if_saved_on_cuda(det_or_scorer) -> None:
    """Set every scorer's ``device`` to ``cuda``, as on the GPU machine that saved it (its state tensors
    are saved from the CPU either way)."""
    scorers = getattr(det_or_scorer, "scorers", {"": det_or_scorer})
    for scorer in scorers.values():
        scorer.set_params(device="cuda")


@pytest.fixture
def no_cuda(monkeypatch):
    """This machine has no CUDA (also on one that does)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _fallback_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "loading it on the CPU" in r.getMessage()]


@pytest.fixture(scope="module")
def saved_on_cuda(tmp_path_factory):
    """A tiny two-scorer detector fitted on the CPU, saved as a GPU machine would; its scores."""
    det = vlad.create_detector("patchcore+padim", weights="tiny", false_alarm_rate=0.25)
    det.fit([textured(i) for i in range(4)])
    expected = det.predict(_images())
    _as_if_saved_on_cuda(det)
    folder = tmp_path_factory.mktemp("saved") / "det"
    det.save(folder)
    return folder, expected


def test_detector_saved_on_cuda_loads_on_the_cpu_with_one_warning(saved_on_cuda, no_cuda, caplog):
    folder, expected = saved_on_cuda
    with caplog.at_level(logging.WARNING):
        det = vlad.load(folder)
    warnings = _fallback_warnings(caplog)
    assert len(warnings) == 1, warnings  # one line for the whole detector, not one per scorer
    assert "cuda" in warnings[0] and str(folder) in warnings[0]
    assert {s.device for s in det.scorers.values()} == {"cpu"}  # get_params says where it runs
    res = det.predict(_images())
    np.testing.assert_allclose(res.image_scores, expected.image_scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.stack(res.anomaly_maps), np.stack(expected.anomaly_maps), rtol=1e-5, atol=1e-6)
    assert list(res.labels) == list(expected.labels)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        vlad.load(folder, device="cpu")  # asked for: no warning
    assert not _fallback_warnings(caplog)


def test_scorer_saved_on_cuda_loads_on_the_cpu_with_one_warning(tmp_path, no_cuda, caplog):
    scorer = vlad.create_scorer("padim", weights="tiny").fit([textured(i) for i in range(3)])
    expected = scorer.predict(_images()).image_scores
    _as_if_saved_on_cuda(scorer)
    scorer.save(tmp_path / "padim")
    with caplog.at_level(logging.WARNING):
        loaded = vlad.load(tmp_path / "padim")
    assert len(_fallback_warnings(caplog)) == 1
    assert loaded.device == "cpu" and loaded.device_.type == "cpu"
    np.testing.assert_allclose(loaded.predict(_images()).image_scores, expected, rtol=1e-5, atol=1e-6)


def test_asking_for_a_missing_device_is_an_error_not_a_fallback(saved_on_cuda, no_cuda):
    folder, _ = saved_on_cuda
    with pytest.raises(vlad.InvalidDeviceError, match="CUDA is not available"):
        vlad.load(folder, device="cuda")


def test_a_saved_device_torch_does_not_know_is_refused(tmp_path, no_cuda):
    import json

    vlad.create_scorer("padim", weights="tiny").fit([textured(0)]).save(tmp_path / "s")
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    config["params"]["device"] = "gpu0"  # a damaged file, not another machine
    (tmp_path / "s" / "config.json").write_text(json.dumps(config))
    with pytest.raises(vlad.InvalidDeviceError, match="gpu0"):
        vlad.load(tmp_path / "s")


def test_cli_load_with_device(saved_on_cuda, no_cuda, tmp_path, capsys, caplog):
    from vlad.cli import main

    folder, expected = saved_on_cuda
    from PIL import Image

    img = tmp_path / "a.png"
    Image.fromarray(_images()[2]).save(img)
    with caplog.at_level(logging.WARNING):
        assert main(["score", str(img), "--load", str(folder), "--device", "cpu"]) == 0
    assert not _fallback_warnings(caplog)
    assert "a.png" in capsys.readouterr().out
    with caplog.at_level(logging.WARNING):
        assert main(["score", str(img), "--load", str(folder)]) == 0  # --device auto: as saved, else the CPU
    assert len(_fallback_warnings(caplog)) == 1
    fails_with_one_line(capsys, ["score", str(img), "--load", str(folder), "--device", "cuda"], "cuda", "not available")


# -- CPU against CUDA (run where there is a GPU) ------------------------------------------------------------

@pytest.fixture
def exact_fp32():
    """TF32 off (cuDNN convolutions use it by default on CUDA) for the length of a test."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _modules(scorer) -> dict[str, torch.nn.Module]:
    """The torch modules a fitted scorer holds (backbones included), by attribute name."""
    out = {}
    for key, value in vars(scorer).items():
        module = getattr(value, "model", value)  # a vlad.backbones.Backbone holds its module in .model
        if isinstance(module, torch.nn.Module):
            out[key] = module
    return out


def _relative_difference(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12))


@pytest.mark.gpu
@pytest.mark.parametrize("name", SCORERS)
def test_same_model_on_cpu_and_cuda(name, exact_fp32):
    extra = {**ILL_CONDITIONED.get(name, {}), **FLOAT32_SEARCH.get(name, {})}
    builds = {}
    for device in ("cpu", "cuda"):
        scorer = vlad.create_scorer(name, **_params(name, device, **extra))
        scorer.device_ = torch.device(device)
        scorer._build()
        builds[device] = {k: {p: t.detach().cpu() for p, t in m.state_dict().items()}
                          for k, m in _modules(scorer).items()}
    assert builds["cpu"].keys() == builds["cuda"].keys() and builds["cpu"]
    for key, state in builds["cpu"].items():  # drawn on the CPU and copied: bit for bit the same
        for param, tensor in state.items():
            assert torch.equal(tensor, builds["cuda"][key][param]), f"{name}: {key}.{param} differs after _build"
    results = {}
    for device in ("cpu", "cuda"):
        scorer = vlad.create_scorer(name, **_params(name, device, **extra)).fit(references())
        assert scorer.device_.type == device
        results[device] = scorer.predict(_images())
    cpu, cuda = results["cpu"], results["cuda"]
    bound = ARITHMETIC_BOUND.get(name, 1e-4)
    assert _relative_difference(cpu.image_scores, cuda.image_scores) <= bound, (cpu.image_scores, cuda.image_scores)
    assert _relative_difference(np.stack(cpu.anomaly_maps), np.stack(cuda.anomaly_maps)) <= bound


@pytest.mark.gpu
def test_detector_fitted_on_cuda_scores_the_same_loaded_on_the_cpu(tmp_path, exact_fp32, monkeypatch, caplog):
    det = vlad.create_detector("patchcore+padim+efficientad", weights="tiny", device="cuda",
                               false_alarm_rate=0.25, scorer_options={"efficientad": settings("efficientad", quick=True)})
    det.fit([textured(i) for i in range(4)])
    expected = det.predict(_images())
    det.save(tmp_path / "det")
    on_cpu = vlad.load(tmp_path / "det", device="cpu")
    assert {s.device_.type for s in on_cpu.scorers.values()} == {"cpu"}
    res = on_cpu.predict(_images())
    assert _relative_difference(expected.image_scores, res.image_scores) <= 1e-4
    assert _relative_difference(np.stack(expected.anomaly_maps), np.stack(res.anomaly_maps)) <= 1e-4
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same folder on a machine without CUDA
    with caplog.at_level(logging.WARNING):
        fallback = vlad.load(tmp_path / "det")
    assert len(_fallback_warnings(caplog)) == 1
    np.testing.assert_allclose(fallback.predict(_images()).image_scores, res.image_scores, rtol=1e-6, atol=1e-7)
