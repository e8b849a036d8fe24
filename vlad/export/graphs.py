"""Each exportable scorer's prediction as one plain torch module: pixels in, scores and maps out.

A graph takes the backbone input(s) already resized, RGB in [0, 1], ``(B, 3, h, w)`` (the resize
depends on each image's own size, so it happens outside, in numpy: :mod:`vlad.runtime.imaging`), and
holds everything else as constants: the normalisation, the backbone, the fitted memory or statistics,
the scoring and the map at the scorer's output resolution. Its outputs are ``scores`` ``(B,)`` and
``maps`` ``(B, h', w')``; a scorer with parts (WinCLIP+) adds ``<part>_scores`` and ``<part>_maps``.

The graphs call the scorers' own module-level functions (``pool_channels``, ``gaussian_blur``,
``harmonic_per_patch``, ...) and, where a scorer method only reads fitted attributes, the method itself
on a module carrying those attributes; nearest-neighbour searches are written out densely (the memory
search of :class:`vlad.memory.KnnIndex` picks its blocks from the query count, which a graph with a
dynamic batch size cannot do), with the same formulas, so distances agree to float rounding. The export
tests check every graph against the scorer's ``predict`` (1e-4).

:data:`GRAPH_BUILDERS` maps a scorer class name to its builder; :func:`register_graph` adds one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlad.errors import ExportError


@dataclass
class InputSpec:
    """One graph input: backbone pixels ``(B, 3, size)``, resized from each image with ``interpolation``.

    ``resize`` says how an image's target shape is found (see :mod:`vlad.runtime.manifest`): every image
    to ``size`` (``{"kind": "fixed"}``), or following its aspect (``"shorter_edge"``), in which case the
    graph takes only the images whose target shape is ``size``.
    """

    name: str
    size: tuple[int, int]
    interpolation: str
    resize: dict[str, Any] = field(default_factory=lambda: {"kind": "fixed"})


@dataclass
class ExportGraph:
    """A scorer's exportable prediction.

    Attributes:
        module: the torch module (eval mode) mapping the inputs to the outputs.
        inputs: its inputs, in order.
        parts: names of the parts it returns besides ``scores``/``maps`` (e.g. ``zero_shot``).
        map_blur: Gaussian sigma applied *after* the map is resized to each image's own size (AnomalyDINO
            smooths at the image's resolution); 0 = none (the map is only resized).
    """

    module: nn.Module
    inputs: list[InputSpec]
    parts: list[str] = field(default_factory=list)
    map_blur: float = 0.0

    @property
    def output_names(self) -> list[str]:
        """``scores``, ``maps``, then ``<part>_scores``, ``<part>_maps`` per part."""
        names = ["scores", "maps"]
        for p in self.parts:
            names += [f"{p}_scores", f"{p}_maps"]
        return names


class _Normalise(nn.Module):
    def __init__(self, mean, std) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _nearest_l2(q: torch.Tensor, memory: torch.Tensor, memory_sq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest memory row of each query ``(B, P, E)``: distances and rows ``(B, P)``, as KnnIndex's l2
    (``min(||m||^2 - 2 q.m)``, then ``+ ||q||^2``, clamped at 0, square root)."""
    s = memory_sq - 2.0 * torch.matmul(q, memory.T)
    v, i = s.min(dim=-1)
    return (v + q.pow(2).sum(-1)).clamp_min(0.0).sqrt(), i


def _nearest_cosine(q: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """``1 - max cos`` of unit queries ``(..., D)`` against unit memory rows, clamped to [0, 2]."""
    return (1.0 - torch.matmul(q, memory.T).amax(dim=-1)).clamp(0.0, 2.0)


# -- PatchCore ------------------------------------------------------------------------------------
class PatchCoreGraph(nn.Module):
    """PatchCore predict: locally aware features, nearest memory patch, reweighted max, blurred map."""

    def __init__(self, scorer: Any) -> None:
        super().__init__()
        pre = scorer.backbone_.spec.preprocess
        self.normalise = _Normalise(pre.mean, pre.std)
        self.backbone = scorer.backbone_.model
        self.register_buffer("memory", scorer.memory_.detach().float().clone())
        self.register_buffer("memory_sq", scorer.memory_sq_.detach().float().clone())
        self.embed_dim = int(scorer.embed_dim)
        self.k = min(int(scorer.num_neighbors), scorer.memory_.shape[0])
        self.size = (scorer.input_size_, scorer.input_size_)
        self.sigma = float(scorer.sigma)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from vlad.ops import gaussian_blur, resize_maps
        from vlad.scorers.patchcore import pool_channels

        feats = self.backbone(self.normalise(pixels))
        grid = feats[0].shape[-2:]
        e = self.embed_dim
        pooled = []
        for f in feats:
            f = F.avg_pool2d(f, kernel_size=3, stride=1, padding=1)
            if f.shape[-2:] != grid:
                f = F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
            pooled.append(pool_channels(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]), e))
        z = pool_channels(torch.cat(pooled, dim=1), e)
        q = z.reshape(pixels.shape[0], -1, e)  # (B, P, E)
        d, nn_idx = _nearest_l2(q, self.memory, self.memory_sq)
        worst = d.argmax(dim=1, keepdim=True)  # (B, 1)
        s_star = d.gather(1, worst)[:, 0]
        if self.k > 1:
            m_star = self.memory[nn_idx.gather(1, worst)[:, 0]]  # (B, E)
            support = (self.memory_sq - 2.0 * m_star @ self.memory.T).topk(self.k, dim=1, largest=False).indices
            worst_q = q.gather(1, worst[:, :, None].expand(-1, 1, e))  # (B, 1, E)
            dist = torch.linalg.vector_norm(worst_q - self.memory[support], dim=2)  # (B, k)
            scores = (1.0 - torch.softmax(dist, dim=1)[:, 0]) * s_star
        else:
            scores = s_star
        maps = resize_maps(d.reshape(-1, grid[0], grid[1]), self.size)
        return scores, gaussian_blur(maps, self.sigma)


def patchcore_graph(scorer: Any, image_size: tuple[int, int] | None = None) -> ExportGraph:
    """PatchCore as an :class:`ExportGraph`."""
    scorer._check_memory()
    pre = scorer.backbone_.spec.preprocess
    size = (scorer.input_size_, scorer.input_size_)
    return ExportGraph(PatchCoreGraph(scorer).eval(), [InputSpec("pixels", size, pre.interpolation)])


# -- AnomalyDINO ----------------------------------------------------------------------------------
class AnomalyDINOGraph(nn.Module):
    """AnomalyDINO predict at one input shape: cosine 1-NN patch distances, mean of the top fraction.

    The map output is the patch-distance grid ``(B, h, w)``; it is resized to each image's size and
    smoothed there (:attr:`ExportGraph.map_blur`), as the scorer does.
    """

    def __init__(self, scorer: Any, shape: tuple[int, int]) -> None:
        super().__init__()
        self.normalise = _Normalise(scorer.preprocess_.mean, scorer.preprocess_.std)
        self.model = scorer.model_
        self.prefix = int(scorer.prefix_)
        self.register_buffer("memory", torch.cat([c.float() for c in scorer.memory_chunks_]).detach().clone())
        self.grid = (shape[0] // scorer.patch_, shape[1] // scorer.patch_)
        n = self.grid[0] * self.grid[1]
        self.k = max(1, int(n * float(scorer.top_fraction)))  # as mean_top_fraction

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.model.forward_features(self.normalise(pixels))[:, self.prefix :].float()
        dist = _nearest_cosine(F.normalize(tokens, dim=-1), self.memory)  # (B, n)
        scores = dist.topk(self.k, dim=1).values.mean(dim=1)
        return scores, dist.reshape(-1, self.grid[0], self.grid[1])


def anomalydino_graph(scorer: Any, image_size: tuple[int, int] | None = None) -> ExportGraph:
    """AnomalyDINO as an :class:`ExportGraph` for images of ``image_size`` ``(H, W)`` (their resized
    shape fixes the graph's input; default: the first reference's size).

    Raises:
        ExportError: foreground masking is in force (a per-image PCA and eigendecomposition, not an
            ONNX graph), or the memory is empty.
    """
    from vlad.scorers.anomalydino import resized_shape

    if not scorer.memory_chunks_:
        raise ExportError("AnomalyDINO cannot be exported: it holds no references (add_references() first)")
    if scorer.masking_active_:
        raise ExportError(
            "AnomalyDINO cannot be exported with foreground masking in force: the mask comes from an "
            "eigendecomposition of each test image's own tokens, which ONNX has no operator for. "
            "Refit with masking=False to export it"
        )
    if image_size is None:
        grid = scorer.ref_info_[0]["grid"]
        shape = (grid[0] * scorer.patch_, grid[1] * scorer.patch_)
    else:
        shape = resized_shape(tuple(int(v) for v in image_size), scorer.shorter_edge_, scorer.patch_)
    module = AnomalyDINOGraph(scorer, shape).eval()
    resize = {"kind": "shorter_edge", "shorter_edge": int(scorer.shorter_edge_), "multiple": int(scorer.patch_)}
    return ExportGraph(module, [InputSpec("pixels", shape, scorer.preprocess_.interpolation, resize)],
                       map_blur=float(scorer.sigma))


# -- PaDiM ----------------------------------------------------------------------------------------
class PaDiMGraph(nn.Module):
    """PaDiM predict: per-position Mahalanobis distance, upsampled and blurred; score = map max.

    It carries the fitted attributes PaDiM's ``mahalanobis`` reads, so that method runs on it unchanged.
    """

    def __init__(self, scorer: Any) -> None:
        super().__init__()
        from vlad.features import stage_channels

        pre = scorer.backbone_.spec.preprocess
        self.normalise = _Normalise(pre.mean, pre.std)
        self.backbone = scorer.backbone_.model
        for name in ("mean_", "basis_", "inv_scale_"):
            self.register_buffer(name, getattr(scorer, name).detach().clone())
        # the channel subset split by stage once, here (PaDiM._features selects it per call with a
        # data-dependent mask, which torch.export cannot trace)
        index, start = scorer.channel_index_.detach().cpu(), 0
        self.stages = []
        for i, c in enumerate(stage_channels(scorer.backbone_)):
            sel = index[(index >= start) & (index < start + c)] - start
            start += c
            if sel.numel():
                self.register_buffer(f"channels_{i}", sel.clone())
                self.stages.append(i)
        self.low_rank_ = bool(scorer.low_rank_)
        self.epsilon = float(scorer.epsilon)
        self.size_ = int(scorer.size_)
        self.sigma = float(scorer.sigma)
        self._scorer_type = type(scorer)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from vlad.ops import gaussian_blur, resize_maps

        stages = list(self.backbone(self.normalise(pixels)))
        grid = stages[0].shape[-2:]
        picked = []
        for i in self.stages:
            f = stages[i].index_select(1, getattr(self, f"channels_{i}"))
            picked.append(f if f.shape[-2:] == grid else F.interpolate(f, size=grid, mode="nearest"))
        dist = self._scorer_type.mahalanobis(self, torch.cat(picked, dim=1))
        maps = gaussian_blur(resize_maps(dist, (self.size_, self.size_)), self.sigma)
        return maps.flatten(1).amax(dim=1), maps


def padim_graph(scorer: Any, image_size: tuple[int, int] | None = None) -> ExportGraph:
    """PaDiM as an :class:`ExportGraph`."""
    pre = scorer.backbone_.spec.preprocess
    return ExportGraph(PaDiMGraph(scorer).eval(), [InputSpec("pixels", (scorer.size_, scorer.size_), pre.interpolation)])


# -- EfficientAD ----------------------------------------------------------------------------------
class EfficientADGraph(nn.Module):
    """EfficientAD predict: normalised teacher features vs the student, quantile-normalised map."""

    def __init__(self, scorer: Any) -> None:
        super().__init__()
        pre = scorer.teacher_.spec.preprocess
        self.normalise = _Normalise(pre.mean, pre.std)
        self.teacher = scorer.teacher_.model
        self.student = scorer.student_
        for name in ("projection_", "mean_", "std_", "q_a_", "q_b_"):
            self.register_buffer(name, getattr(scorer, name).detach().clone())
        self.grid_ = tuple(scorer.grid_)
        self.size_ = tuple(scorer.size_)
        self._scorer_type = type(scorer)

    def forward(self, teacher_pixels: torch.Tensor, student_pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = [F.interpolate(F.avg_pool2d(f, 3, 1, 1, count_include_pad=False), size=self.grid_,
                               mode="bilinear", align_corners=False)
                 for f in self.teacher(self.normalise(teacher_pixels))]
        t = torch.einsum("bchw,cd->bdhw", torch.cat(feats, dim=1), self.projection_)
        t = (t - self.mean_) / self.std_
        m = self._scorer_type._raw_map(self, t, self.student(self.normalise(student_pixels)))
        maps = 0.1 * (m - self.q_a_) / (self.q_b_ - self.q_a_).clamp_min(1e-12)
        return maps.flatten(1).amax(dim=1), maps


def efficientad_graph(scorer: Any, image_size: tuple[int, int] | None = None) -> ExportGraph:
    """EfficientAD as an :class:`ExportGraph` (two inputs: the teacher's bicubic and the student's
    bilinear resize of the same image)."""
    pre = scorer.teacher_.spec.preprocess
    size = tuple(scorer.size_)
    return ExportGraph(EfficientADGraph(scorer).eval(),
                       [InputSpec("teacher_pixels", size, pre.interpolation), InputSpec("student_pixels", size, "bilinear")])


# -- WinCLIP --------------------------------------------------------------------------------------
class WinCLIPGraph(nn.Module):
    """WinCLIP (and WinCLIP+) predict with the text prototypes, window gathers and memories baked in.

    The windows of all images run as one batch of short sequences, gathered with constant indices
    (``(B * n_windows, 1 + k * k, W)``; no chunking, so the batch size stays symbolic). It carries the
    attributes WinCLIP's ``_class_scores`` and ``_zero_shot`` read, so those run on it unchanged.
    """

    def __init__(self, scorer: Any) -> None:
        super().__init__()
        pre = scorer.backbone_.spec.preprocess
        self.normalise = _Normalise(pre.mean, pre.std)
        self.visual = scorer.backbone_.model.visual  # registered: its weights are the graph's
        self.encoder = scorer.encoder_
        self.register_buffer("text_prototypes_", scorer.text_prototypes_.detach().float().clone())
        self.temperature = float(scorer.temperature)
        self.scales_ = tuple(scorer.scales_)
        self.coverage_ = {k: v.detach().clone() for k, v in scorer.coverage_.items()}
        for k in self.scales_:
            self.register_buffer(f"windows_{k}", scorer.windows_[k].detach().clone() + 1)  # skip the class token
        memory = scorer.memory_
        self.few_shot = memory is not None
        if self.few_shot:
            self.register_buffer("memory_patch", memory["patch"].detach().float().clone())
            for k in self.scales_:
                self.register_buffer(f"memory_win_{k}", memory["win"][k].detach().float().clone())
        self.grid = tuple(scorer.encoder_.grid)
        self._scorer_type = type(scorer)

    def _class_scores(self, emb: torch.Tensor) -> torch.Tensor:
        return self._scorer_type._class_scores(self, emb)

    def _windows(self, tokens: torch.Tensor, k: int) -> torch.Tensor:
        idx = getattr(self, f"windows_{k}")  # (n_win, k*k)
        n_win, kk = idx.shape
        width = tokens.shape[-1]
        patch_tok = tokens[:, idx.reshape(-1)].reshape(-1, kk, width)  # (B * n_win, k*k, W)
        cls = tokens[:, :1].repeat_interleave(n_win, dim=0)  # (B * n_win, 1, W), image-major as patch_tok
        emb = self.encoder.encode_sequences(torch.cat([cls, patch_tok], dim=1))
        return F.normalize(emb.reshape(tokens.shape[0], n_win, -1), dim=-1)

    def forward(self, pixels: torch.Tensor):
        from vlad.scorers.winclip import harmonic_per_patch

        cls = self._scorer_type
        tokens = self.encoder.embed(self.normalise(pixels))
        image, patches = self.encoder.encode_full(tokens)
        feats = {"image": F.normalize(image, dim=-1), "patches": F.normalize(patches, dim=-1),
                 "windows": {k: self._windows(tokens, k) for k in self.scales_}}
        score, amap = cls._zero_shot(self, feats)
        gh, gw = self.grid
        if not self.few_shot:
            return score, amap.reshape(-1, gh, gw)
        maps = [_nearest_cosine(feats["patches"], self.memory_patch) / 2.0]
        for k in self.scales_:
            assoc = _nearest_cosine(feats["windows"][k], getattr(self, f"memory_win_{k}")) / 2.0
            maps.append(harmonic_per_patch(assoc, self.coverage_[k]))
        fs = torch.stack(maps).mean(0)
        fs_score = fs.amax(dim=1)
        return ((score + fs_score) / 2.0, ((amap + fs) / 2.0).reshape(-1, gh, gw),
                score, amap.reshape(-1, gh, gw), fs_score, fs.reshape(-1, gh, gw))


def winclip_graph(scorer: Any, image_size: tuple[int, int] | None = None) -> ExportGraph:
    """WinCLIP (WinCLIP+ once it holds references) as an :class:`ExportGraph`."""
    pre = scorer.backbone_.spec.preprocess
    module = WinCLIPGraph(scorer).eval()
    parts = ["zero_shot", "few_shot"] if module.few_shot else []
    return ExportGraph(module, [InputSpec("pixels", tuple(scorer.image_size_), pre.interpolation)], parts=parts)


#: scorer class name -> builder of its :class:`ExportGraph`
GRAPH_BUILDERS: dict[str, Callable[..., ExportGraph]] = {
    "PatchCore": patchcore_graph,
    "AnomalyDINO": anomalydino_graph,
    "PaDiM": padim_graph,
    "EfficientAD": efficientad_graph,
    "WinCLIP": winclip_graph,
}

#: why the other built-in scorers are not exported (shown in the error)
NOT_EXPORTABLE: dict[str, str] = {
    "MAEDAY": "it draws fresh random masks on every call, so its output is not a fixed function of the image",
    "FastFlow": "its normalizing-flow graph has not been checked against ONNX yet",
    "STPM": "its graph has not been checked against ONNX yet",
    "AutoEncoder": "its graph has not been checked against ONNX yet",
    "DRAEM": "its graph has not been checked against ONNX yet",
    "PatchSVDD": "its graph has not been checked against ONNX yet",
    "SPADE": "its graph has not been checked against ONNX yet",
}


def register_graph(class_name: str) -> Callable[[Callable[..., ExportGraph]], Callable[..., ExportGraph]]:
    """Decorator registering ``builder(scorer, image_size=None) -> ExportGraph`` for scorers of class
    ``class_name`` (``image_size``: the ``(H, W)`` of the images to deploy on, for graphs whose input
    shape follows the image's aspect)."""

    def decorator(builder: Callable[..., ExportGraph]) -> Callable[..., ExportGraph]:
        GRAPH_BUILDERS[class_name] = builder
        return builder

    return decorator


def build_graph(name: str, scorer: Any, image_size: tuple[int, int] | None = None) -> ExportGraph:
    """The :class:`ExportGraph` of the fitted ``scorer`` (registered as ``name``).

    Raises:
        ExportError: the scorer cannot be exported; the message says which and why.
    """
    cls = type(scorer).__name__
    if getattr(scorer, "tile_size", None):
        raise ExportError(f"scorer {name!r} scores large images in tiles (tile_size={scorer.tile_size}) and the "
                          "exported graphs score whole images; export a detector built without tile_size, or "
                          "score the large images with vlad itself")
    builder = GRAPH_BUILDERS.get(cls)
    if builder is None:
        why = NOT_EXPORTABLE.get(cls, "no ONNX graph is registered for it (vlad.export.graphs.register_graph)")
        exportable = ", ".join(sorted(GRAPH_BUILDERS))
        raise ExportError(f"scorer {name!r} ({cls}) cannot be exported to ONNX: {why}. Exportable scorers: "
                          f"{exportable}; drop {name!r} from the spec to export the rest")
    if getattr(scorer, "map_rule_", None) is not None:  # the graphs compute the paper's map, not a chosen rule
        raise ExportError(f"scorer {name!r} ({cls}) chose its map rule on synthetic defects (selection='synthetic'), "
                          "which the exported graphs do not compute yet; export one fitted with selection=None "
                          "(its paper's map), or score with vlad itself")
    return builder(scorer, image_size)
