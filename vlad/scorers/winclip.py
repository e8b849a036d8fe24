"""WinCLIP (zero-shot) and WinCLIP+ (few-shot) anomaly scoring with a CLIP ViT.

Paper: Jeong et al., "WinCLIP: Zero-/Few-Shot Anomaly Classification and Segmentation", CVPR 2023,
arXiv 2303.14814. Default backbone OpenCLIP ViT-B-16-plus-240 (laion400m_e31): 240 px, 15x15 patches.

Zero-shot: a compositional prompt ensemble (:mod:`vlad.prompts`) gives a normal and an anomalous text
prototype. The image score is ``softmax([cos(f, t_normal), cos(f, t_anomalous)] / T)[anomalous]`` of the
class-token embedding ``f``. For each scale ``k`` (2 and 3) every ``k x k`` window of patches (stride 1)
is embedded on its own: the class token plus that window's tokens (patch + positional embedding and
``ln_pre`` applied on the full grid first, then gathered) go through the whole transformer, the class
token is pooled and projected. A patch's score per scale is the harmonic mean of the scores of the
windows covering it; the map is the harmonic mean of {image score, 2x2 map, 3x3 map}.

WinCLIP+ (references given): memories of the references' final patch tokens and of their window
embeddings per scale; association = ``min over memory (1 - cos) / 2``; the few-shot map is the mean of
the patch map and the per-scale window maps (harmonic mean over covering windows, as for zero-shot); the
final map is the mean of the zero-shot and few-shot maps and the image score is
``(zero-shot score + max few-shot map) / 2``.

The window path is batched: all windows of all images of a batch run through the transformer as one
batch of short sequences (gathered with an index tensor), in chunks that bound memory. Open_clip >= 2.26
runs its transformer batch-first; treating window batches as sequence-first (anomalib's bug) makes the
class tokens of all windows attend to each other and gives a flat map. Savings that keep results exact:
attention is per window (no full-grid masking); the last block computes only the class token of each
window (the only token pooled); the full-image pass gives both the image embedding and the patch tokens.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vlad.errors import VladError
from vlad.images import LoadedImage
from vlad.memory import KnnIndex
from vlad.ops import preprocess_batch
from vlad.precision import to_float32
from vlad.prompts import PromptSet, PromptsLike, clip_weights_id, load_prompts, text_cache
from vlad import paramspec as ps
from vlad.scorers.base import BaseScorer, FewShotMixin

logger = logging.getLogger(__name__)

#: Tokens per chunk of window sequences pushed through the transformer at once (bounds memory).
WINDOW_CHUNK_TOKENS = 8192
_EPS = 1e-12
_UNSET: Any = object()


# -- plain torch: windows and harmonic aggregation ----------------------------------------------
def window_indices(grid: tuple[int, int], k: int) -> torch.Tensor:
    """Patch indices of every ``k x k`` window at stride 1, row-major: long ``(n_windows, k * k)``."""
    gh, gw = grid
    if not 1 <= k <= min(gh, gw):
        raise VladError(f"window scale {k} does not fit the {gh}x{gw} patch grid; use scales between 1 and {min(gh, gw)}")
    rows = torch.arange(gh - k + 1)
    cols = torch.arange(gw - k + 1)
    offs = (torch.arange(k)[:, None] * gw + torch.arange(k)[None, :]).reshape(-1)
    starts = (rows[:, None] * gw + cols[None, :]).reshape(-1)
    return starts[:, None] + offs[None, :]


def coverage_matrix(indices: torch.Tensor, n_patches: int) -> torch.Tensor:
    """Float ``(n_windows, n_patches)``: 1 where a window covers a patch."""
    cov = torch.zeros(indices.shape[0], n_patches)
    cov.scatter_(1, indices, 1.0)
    return cov


def harmonic_per_patch(window_scores: torch.Tensor, coverage: torch.Tensor) -> torch.Tensor:
    """Harmonic mean, per patch, of the scores of the windows covering it.

    Args:
        window_scores: ``(B, n_windows)``, positive.
        coverage: ``(n_windows, n_patches)`` from :func:`coverage_matrix`.

    Returns:
        ``(B, n_patches)``.
    """
    inv = 1.0 / window_scores.clamp_min(_EPS)
    return coverage.sum(0) / (inv @ coverage)


def association(queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """``min over memory (1 - cos) / 2`` for L2-normalised ``queries`` ``(B, n, C)`` and ``memory`` ``(M, C)``:
    ``(B, n)``; the exact search of :class:`vlad.memory.KnnIndex` (cosine on unit rows)."""
    flat = queries.reshape(-1, queries.shape[-1])
    dist = KnnIndex(memory, "cosine", normalized=True).search(flat)[0][:, 0]
    return (dist / 2.0).reshape(queries.shape[:-1])


def encode_text_trimmed(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens)`` computed over the first ``L`` context positions only.

    ``L`` is one past the last pooled (end-of-text) position in the batch. A causal text tower never lets
    a position see later ones, so the pooled outputs are exactly those of the full 77-token pass, at a
    fraction of the cost (prompts are ~10-20 tokens). Falls back to ``encode_text`` for any model that
    is not a causal open_clip ``CLIP`` pooling at the end-of-text token.

    Args:
        model: an open_clip CLIP.
        tokens: long ``(B, context_length)`` from the model's tokenizer.

    Returns:
        ``(B, D)`` text embeddings (not normalised).
    """
    import open_clip
    from open_clip.transformer import text_global_pool

    mask = getattr(model, "attn_mask", None)
    pool = getattr(model, "text_pool_type", None)
    usable = (type(model) is open_clip.CLIP and isinstance(mask, torch.Tensor) and pool in ("argmax", "eos")
              and mask.shape[-1] == tokens.shape[1])
    if usable:
        n = mask.shape[-1]
        usable = bool(torch.equal(torch.isinf(mask.float()), torch.ones(n, n, dtype=torch.bool, device=mask.device).triu(1)))
    if not usable:
        return model.encode_text(tokens)
    eos_id = getattr(model, "text_eos_id", None)
    if pool == "argmax":
        pos = tokens.argmax(dim=-1)
    else:
        pos = (tokens == eos_id).int().argmax(dim=-1)
    length = int(pos.max()) + 1
    text = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(text).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=mask[:length, :length])
    x = model.ln_final(x)
    x = text_global_pool(x, text, pool, eos_token_id=eos_id)
    proj = model.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


# -- plain torch: the CLIP visual tower, full image and windows -----------------------------------
class ClipWindowEncoder:
    """Runs an open_clip ``VisionTransformer`` on full images and on windows of its patch grid.

    Args:
        visual: ``model.visual`` of an open_clip CLIP with a ViT image tower.

    Raises:
        VladError: the tower is not a ViT this path supports (ResNet, timm towers, attentional pooling).
    """

    def __init__(self, visual: torch.nn.Module) -> None:
        needed = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post", "proj")
        missing = [a for a in needed if getattr(visual, a, None) is None]
        if missing or getattr(visual, "attn_pool", None) is not None:
            raise VladError(
                f"WinCLIP needs an open_clip ViT image tower (conv1, class/positional embeddings, ln_pre, "
                f"transformer, ln_post, proj, no attentional pooling); {type(visual).__name__} lacks "
                f"{missing or ['plain token pooling']}. Use a ViT backbone such as ViT-B-16-plus-240."
            )
        self.pool_type = getattr(visual, "pool_type", "tok")
        if self.pool_type not in ("tok", "avg"):
            raise VladError(f"WinCLIP supports class-token or average pooling, got pool_type={self.pool_type!r}")
        self.visual = visual
        self.image_size = tuple(getattr(visual, "image_size", (0, 0)))
        self.patch_size = tuple(visual.conv1.kernel_size)
        self.grid = (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])
        self.blocks = list(visual.transformer.resblocks)
        # open_clip >= 2.26 is batch-first; older versions have no flag and run (L, N, D).
        self.batch_first = bool(getattr(visual.transformer, "batch_first", False))

    # embeddings on the full grid: patch embedding + positional embedding + ln_pre, (B, 1 + N, W)
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> tokens ``(B, 1 + N, W)`` (class token first), ready for the blocks."""
        v = self.visual
        if tuple(images.shape[-2:]) != self.image_size:
            raise VladError(f"expected images of {self.image_size}, got {tuple(images.shape[-2:])}")
        x = v.conv1(images.to(v.conv1.weight.dtype))
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        return v.ln_pre(x)

    def run_blocks(self, x: torch.Tensor, blocks: Sequence[torch.nn.Module]) -> torch.Tensor:
        """Apply ``blocks`` to batch-first tokens ``(N, L, W)``, honouring the transformer's layout."""
        if not self.batch_first:
            x = x.transpose(0, 1)
        for blk in blocks:
            x = blk(x)
        return x.transpose(0, 1) if not self.batch_first else x

    def _last_block_class_token(self, x: torch.Tensor) -> torch.Tensor:
        """Output of the last block for the class token only: ``(N, L, W)`` -> ``(N, W)``.

        Exactly the block's computation restricted to one query (keys/values are all tokens); falls back
        to the full block for block types without the standard layout.
        """
        blk = self.blocks[-1]
        attn = getattr(blk, "attn", None)
        if not isinstance(attn, torch.nn.MultiheadAttention) or hasattr(blk, "ln_1_kv") or not hasattr(blk, "mlp"):
            return self.run_blocks(x, [blk])[:, 0]
        h = blk.ln_1(x)
        q = h[:, :1]
        if not attn.batch_first:
            q, h = q.transpose(0, 1), h.transpose(0, 1)
        a = attn(q, h, h, need_weights=False)[0]
        if not attn.batch_first:
            a = a.transpose(0, 1)
        c = x[:, :1] + blk.ls_1(a)
        c = c + blk.ls_2(blk.mlp(blk.ln_2(c)))
        return c[:, 0]

    def _project(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.visual.ln_post(pooled) @ self.visual.proj

    def encode_full(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-image pass from :meth:`embed` tokens.

        Returns:
            image embeddings ``(B, D)`` (as ``encode_image``) and final patch tokens after ``ln_post``
            ``(B, N, W)`` (WinCLIP+'s patch-level features).
        """
        x = self.run_blocks(tokens, self.blocks)
        v = self.visual
        if self.pool_type == "tok":
            out = v.ln_post(x)
            return out[:, 0] @ v.proj, out[:, 1:]
        pooled = x[:, 1:].mean(dim=1)
        if getattr(v, "final_ln_after_pool", False):
            return v.ln_post(pooled) @ v.proj, v.ln_post(x[:, 1:])
        out = v.ln_post(x)
        return out[:, 1:].mean(dim=1) @ v.proj, out[:, 1:]

    def encode_sequences(self, seqs: torch.Tensor) -> torch.Tensor:
        """Embed independent token sequences ``(S, 1 + k, W)`` (class token first): ``(S, D)``."""
        x = self.run_blocks(seqs, self.blocks[:-1])
        if self.pool_type == "tok":
            return self._project(self._last_block_class_token(x))
        x = self.run_blocks(x, self.blocks[-1:])
        v = self.visual
        if getattr(v, "final_ln_after_pool", False):
            return self._project(x[:, 1:].mean(dim=1))
        return v.ln_post(x[:, 1:]).mean(dim=1) @ v.proj

    def encode_windows(self, tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Window embeddings, all windows of all images batched.

        Args:
            tokens: ``(B, 1 + N, W)`` from :meth:`embed`.
            indices: ``(n_windows, k)`` patch indices per window (:func:`window_indices`).

        Returns:
            ``(B, n_windows, D)``.
        """
        b, _, w = tokens.shape
        n_win, k = indices.shape
        idx = indices.to(tokens.device) + 1  # skip the class token
        seq_len = k + 1
        per_chunk = max(1, WINDOW_CHUNK_TOKENS // seq_len)
        flat_img = torch.arange(b, device=tokens.device).repeat_interleave(n_win)  # (B * n_win,)
        flat_win = torch.arange(n_win, device=tokens.device).repeat(b)
        out = []
        for start in range(0, b * n_win, per_chunk):
            img = flat_img[start : start + per_chunk]
            win = flat_win[start : start + per_chunk]
            patch_tok = tokens[img[:, None], idx[win]]  # (S, k, W)
            seqs = torch.cat([tokens[img, :1], patch_tok], dim=1)  # (S, 1 + k, W)
            out.append(self.encode_sequences(seqs))
        return torch.cat(out).reshape(b, n_win, -1)

    def encode_windows_naive(self, tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Reference path: one window of one image at a time (slow; for tests). ``(B, n_windows, D)``."""
        out = torch.empty(tokens.shape[0], indices.shape[0], self.visual.proj.shape[1], dtype=tokens.dtype)
        for i in range(tokens.shape[0]):
            for j, idx in enumerate(indices.tolist()):
                seq = torch.cat([tokens[i, :1], tokens[i, [p + 1 for p in idx]]])[None]
                x = self.run_blocks(seq, self.blocks)
                out[i, j] = self._project(x[:, 0])[0] if self.pool_type == "tok" else self.encode_sequences(seq)[0]
        return out


# -- the scorer -----------------------------------------------------------------------------------
class WinCLIP(FewShotMixin, BaseScorer):
    """WinCLIP zero-shot scorer; becomes WinCLIP+ when given normal reference images.

    Args:
        object_name: what is inspected, in words ("metal plate"); fills the prompts.
        prompts: None for the paper's ensemble (plus a shipped per-object file if one matches
            ``object_name``), a YAML file, a folder (``default.yaml``, ``objects/<name>.yaml``), a dict
            with the YAML keys, or a :class:`~vlad.prompts.PromptSet`. See :mod:`vlad.prompts`.
        scales: window sizes in patches (paper: 2 and 3).
        temperature: softmax temperature of the text-image similarities (paper: 0.07).
        backbone: an open_clip ViT name from :mod:`vlad.weights` (paper: ``ViT-B-16-plus-240``).
        weights: ``"pretrained"``, ``"random"``, ``"tiny"`` or a path to local weights.
        device: torch device, or ``"auto"``.
        batch_size: images per forward pass.
        image_size: input size; None = the backbone's native size (CLIP position embeddings are fixed,
            so another size is an error).
        random_state: seed of the backbone's initialisation with ``weights="random"`` (nothing else in
            WinCLIP is random).
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"``: the pretrained backbone's forwards run
            under autocast at that dtype and their outputs are cast to float32 before anything else
            (:mod:`vlad.precision`). The text prototypes are always computed in float32 (once, and cached).
    """

    requires_references = False
    output_scale = "probability"  # zero-shot: the softmax probability of the anomalous prompts
    #: with references (WinCLIP+), the score is (zero-shot probability + few-shot distance) / 2; the two
    #: parts are returned in ``components`` so each is calibrated as what it is
    part_scales = {"zero_shot": "probability", "few_shot": "score"}

    #: what each parameter accepts (see vlad.paramspec; device, batch_size, ... are BaseScorer's)
    _param_specs = {
        "object_name": ps.Str(what="a non-empty string (what is inspected, in words)"),
        "prompts": ps.Prompts(),
        "scales": ps.Seq(ps.Int(1, 64), 1, 16, example="(2, 3), the paper's"),
        "temperature": ps.Number(0, 100, lo_open=True).explain("the paper uses 0.07"),
        "image_size": ps.SQUARE_IMAGE_SIZE,
        "random_state": ps.SEED,
    }

    def __init__(
        self,
        object_name: str = "object",
        prompts: PromptsLike = None,
        scales: Sequence[int] = (2, 3),
        temperature: float = 0.07,
        backbone: str = "ViT-B-16-plus-240",
        weights: str = "pretrained",
        device: str = "cpu",
        batch_size: int = 8,
        image_size: int | None = None,
        random_state: int = 0,
        precision: str = "fp32",
    ) -> None:
        self.object_name = object_name
        self.prompts = prompts
        self.scales = scales
        self.temperature = temperature
        self.backbone = backbone
        self.weights = weights
        self.device = device
        self.batch_size = batch_size
        self.image_size = image_size
        self.random_state = random_state
        self.precision = precision

    # -- building -------------------------------------------------------------------------------
    def _build(self) -> None:
        from vlad.backbones import load_backbone

        if not isinstance(self.temperature, (int, float)) or self.temperature <= 0:
            raise VladError(f"temperature must be a positive number (paper: 0.07), got {self.temperature!r}")
        scales = tuple(self.scales)
        if not scales or any(not isinstance(k, (int, np.integer)) or isinstance(k, bool) for k in scales):
            raise VladError(f"scales must be a non-empty sequence of window sizes in patches, e.g. (2, 3); got {self.scales!r}")
        bb = load_backbone(self.backbone, self.weights, self.device_, seed=self.weights_seed)
        if not hasattr(bb.model, "encode_text") or bb.tokenizer is None:
            raise VladError(f"WinCLIP needs a CLIP backbone (image and text towers); {self.backbone!r} is {bb.spec.library}")
        self.backbone_ = bb
        self.encoder_ = ClipWindowEncoder(bb.model.visual)
        native = self.encoder_.image_size
        if self.image_size is not None and (self.image_size, self.image_size) != native:
            raise VladError(
                f"{bb.spec.name}'s CLIP image tower takes {native[0]}x{native[1]} px inputs (fixed position "
                f"embeddings), got image_size={self.image_size}; leave image_size=None"
            )
        self.image_size_ = native
        grid = self.encoder_.grid
        n = grid[0] * grid[1]
        self.scales_ = tuple(int(k) for k in scales)
        self.windows_ = {k: window_indices(grid, k) for k in self.scales_}
        self.coverage_ = {k: coverage_matrix(idx, n).to(self.device_) for k, idx in self.windows_.items()}
        self.weights_id_ = clip_weights_id(bb.model)

    # -- text side --------------------------------------------------------------------------------
    def _encode_text(self, sentences: list[str]) -> torch.Tensor:
        model, tok = self.backbone_.model, self.backbone_.tokenizer
        with torch.inference_mode():
            return encode_text_trimmed(model, tok(sentences).to(self.device_))

    def _set_text(self, prompt_set: PromptSet, known: dict[str, torch.Tensor] | None = None) -> None:
        """Compute (or reuse) the sentence embeddings of ``prompt_set`` and the two class prototypes."""
        t0 = time.perf_counter()
        normal, anomalous = prompt_set.expand(self.object_name)
        known = dict(known or {})
        missing = [s for s in dict.fromkeys(normal + anomalous) if s not in known]
        cache = text_cache()
        before = cache.stats["encoded"]
        if missing:
            persist = bool(self.backbone_.pretrained) and os.environ.get("VLAD_TEXT_CACHE", "1") != "0"
            emb = cache.encode(missing, self._encode_text, backbone=self.backbone_.spec.name,
                               weights_id=self.weights_id_, persist=persist)
            known.update(zip(missing, F.normalize(emb.float(), dim=-1)))
        encoded = cache.stats["encoded"] - before
        self.text_stats_ = {"sentences": len(normal) + len(anomalous), "encoded": encoded,
                            "reused": len(dict.fromkeys(normal + anomalous)) - encoded,  # own or cache hits
                            "seconds": time.perf_counter() - t0}
        self.prompt_set_ = prompt_set
        self.normal_sentences_, self.anomalous_sentences_ = normal, anomalous
        self.text_normal_ = torch.stack([known[s] for s in normal]).to(self.device_)
        self.text_anomalous_ = torch.stack([known[s] for s in anomalous]).to(self.device_)
        protos = torch.stack([self.text_normal_.mean(0), self.text_anomalous_.mean(0)])
        self.text_prototypes_ = F.normalize(protos, dim=-1)  # (2, D)

    def _known_text(self) -> dict[str, torch.Tensor]:
        if not hasattr(self, "text_normal_"):
            return {}
        pairs = zip(self.normal_sentences_ + self.anomalous_sentences_,
                    torch.cat([self.text_normal_, self.text_anomalous_]).cpu())
        return dict(pairs)

    def set_prompts(self, prompts: PromptsLike = _UNSET, object_name: str | None = None) -> WinCLIP:
        """Change the prompts and/or object name of a fitted scorer; only new sentences are encoded.

        References and their memories are kept (they do not depend on the text). ``text_stats_`` tells
        how many sentences were encoded and how many reused.

        Args:
            prompts: as in the constructor; omitted = keep the current ones.
            object_name: new object name; None = keep.

        Raises:
            PromptError: malformed prompts (the scorer is left unchanged).
        """
        self._check_fitted()
        new_prompts = self.prompts if prompts is _UNSET else prompts
        if isinstance(new_prompts, PromptSet):
            new_prompts = new_prompts.to_dict()
        new_name = self.object_name if object_name is None else object_name
        prompt_set = load_prompts(new_prompts, new_name)  # validate before changing anything
        prompt_set.expand(new_name)
        old_name = self.object_name
        self.object_name = new_name
        try:
            self._set_text(prompt_set, self._known_text())
        except Exception:
            self.object_name = old_name
            raise
        self.prompts = new_prompts
        return self

    # -- image side -------------------------------------------------------------------------------
    def _features(self, images: list[LoadedImage]) -> dict[str, Any]:
        """Normalised image embedding ``(B, D)``, patch tokens ``(B, N, W)``, window embeddings per scale."""
        pre = self.backbone_.spec.preprocess
        x = preprocess_batch(images, pre, self.device_, size=self.image_size_)
        with self._autocast():  # the image tower only; the text prototypes are computed in float32
            tokens = self.encoder_.embed(x)
            image, patches = self.encoder_.encode_full(tokens)
            windows = {k: self.encoder_.encode_windows(tokens, idx) for k, idx in self.windows_.items()}
        image, patches, windows = to_float32((image, patches, windows))
        windows = {k: F.normalize(w, dim=-1) for k, w in windows.items()}
        return {"image": F.normalize(image, dim=-1), "patches": F.normalize(patches, dim=-1), "windows": windows}

    def _class_scores(self, emb: torch.Tensor) -> torch.Tensor:
        logits = emb @ self.text_prototypes_.T / self.temperature
        return logits.softmax(dim=-1)[..., 1]

    def _zero_shot(self, feats: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        score = self._class_scores(feats["image"])  # (B,)
        n = feats["patches"].shape[1]
        maps = [score[:, None].expand(-1, n)]
        for k in self.scales_:
            maps.append(harmonic_per_patch(self._class_scores(feats["windows"][k]), self.coverage_[k]))
        stacked = torch.stack(maps)  # (1 + n_scales, B, N)
        zs_map = stacked.shape[0] / (1.0 / stacked.clamp_min(_EPS)).sum(0)
        return score, zs_map

    def _few_shot_map(self, feats: dict[str, Any], memory: dict[str, Any]) -> torch.Tensor:
        maps = [association(feats["patches"], memory["patch"])]
        for k in self.scales_:
            maps.append(harmonic_per_patch(association(feats["windows"][k], memory["win"][k]), self.coverage_[k]))
        return torch.stack(maps).mean(0)  # (B, N)

    def _grid(self, flat: torch.Tensor) -> torch.Tensor:
        return flat.reshape(flat.shape[0], *self.encoder_.grid)

    def _predict_batch(self, images: list[LoadedImage]) -> tuple:
        feats = self._features(images)
        score, amap = self._zero_shot(feats)
        if self.memory_ is None:
            return score, self._grid(amap)
        fs = self._few_shot_map(feats, self.memory_)
        fs_score = fs.amax(dim=1)
        parts = {"zero_shot": (score, self._grid(amap)), "few_shot": (fs_score, self._grid(fs))}
        return (score + fs_score) / 2.0, self._grid((amap + fs) / 2.0), parts

    # -- few-shot memory --------------------------------------------------------------------------
    def _fit(self, references: list[LoadedImage] | None) -> None:
        self._set_text(load_prompts(self.prompts, self.object_name))
        self.memory_chunks_: list[dict[str, Any]] = []
        self.reference_names_: list[str] = []
        if references:
            with torch.inference_mode():
                self.memory_chunks_ = self._embed_references(references)
            self.reference_names_ = [img.name for img in references]
        self._memory_changed()

    def _embed_references(self, images: list[LoadedImage]) -> list[dict[str, Any]]:
        chunks = []
        bs = max(1, int(self.batch_size or 1))
        for i in range(0, len(images), bs):
            feats = self._features(images[i : i + bs])
            zs, _ = self._zero_shot(feats)
            for j in range(len(zs)):
                chunks.append({
                    "patch": feats["patches"][j].clone(),
                    "win": {k: feats["windows"][k][j].clone() for k in self.scales_},
                    "zs": zs[j].clone(),
                })
        return chunks

    @staticmethod
    def _concat(chunks: list[dict[str, Any]], scales: Sequence[int]) -> dict[str, Any] | None:
        if not chunks:
            return None
        return {"patch": torch.cat([c["patch"] for c in chunks]),
                "win": {k: torch.cat([c["win"][k] for c in chunks]) for k in scales}}

    def _memory_changed(self) -> None:
        self.memory_ = self._concat(self.memory_chunks_, self.scales_)

    def leave_one_out_scores(self) -> np.ndarray:
        """WinCLIP+ image score of each reference against a memory of the other references: ``(n_refs,)``.

        Raises:
            VladError: fewer than two references.
        """
        self._check_fitted()
        n = len(self.memory_chunks_)
        if n < 2:
            raise VladError(f"leave-one-out scores need at least 2 references, have {n}; add_references() first")
        out = np.empty(n, dtype=np.float32)
        with torch.inference_mode():
            for i, chunk in enumerate(self.memory_chunks_):
                others = self._concat(self.memory_chunks_[:i] + self.memory_chunks_[i + 1 :], self.scales_)
                feats = {"patches": chunk["patch"][None], "windows": {k: chunk["win"][k][None] for k in self.scales_}}
                fs = self._few_shot_map(feats, others)
                out[i] = float((chunk["zs"] + fs.amax()) / 2.0)
        return out

    # -- persistence ------------------------------------------------------------------------------
    def save(self, path):
        """Save parameters, text embeddings, prompts and reference memories (see :meth:`BaseScorer.save`)."""
        if isinstance(self.prompts, PromptSet):
            self.prompts = self.prompts.to_dict()  # same value, JSON-able
        return super().save(path)

    def _get_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {"text_normal": self.text_normal_, "text_anomalous": self.text_anomalous_}
        for i, c in enumerate(self.memory_chunks_):
            tensors[f"ref.{i}.patch"] = c["patch"]
            tensors[f"ref.{i}.zs"] = c["zs"].reshape(1)
            for k in self.scales_:
                tensors[f"ref.{i}.win{k}"] = c["win"][k]
        meta = {"prompt_set": self.prompt_set_.to_dict(), "object_name": self.object_name,
                "reference_names": list(self.reference_names_), "grid": list(self.encoder_.grid),
                "scales": list(self.scales_), "weights_id": self.weights_id_}
        return tensors, meta

    def _set_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if list(meta.get("grid", [])) != list(self.encoder_.grid):
            raise VladError(f"saved scorer used a {meta.get('grid')} patch grid, this backbone has {self.encoder_.grid}")
        if meta.get("weights_id") not in (None, self.weights_id_):
            logger.warning("the saved WinCLIP was fitted with different backbone weights; its memories may not match")
        prompt_set = PromptSet.from_dict(meta["prompt_set"], source="saved scorer")
        normal, anomalous = prompt_set.expand(self.object_name)
        tn, ta = tensors["text_normal"], tensors["text_anomalous"]
        if len(normal) != tn.shape[0] or len(anomalous) != ta.shape[0]:
            raise VladError("saved text embeddings do not match the saved prompts; re-fit and save again")
        known = dict(zip(normal + anomalous, torch.cat([tn, ta]).float().cpu()))
        self._set_text(prompt_set, known)
        names = list(meta.get("reference_names", []))
        self.memory_chunks_ = [
            {"patch": tensors[f"ref.{i}.patch"], "zs": tensors[f"ref.{i}.zs"][0],
             "win": {k: tensors[f"ref.{i}.win{k}"] for k in self.scales_}}
            for i in range(len(names))
        ]
        self.reference_names_ = names
        self._memory_changed()
