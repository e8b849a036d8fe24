"""MAEDAY: zero-shot anomaly maps from the reconstruction error of a masked autoencoder.

Implements the zero-shot tier of *MAEDAY: MAE for few and zero shot AnomalY-Detection*, Schwartz et al.
2022 (arXiv:2211.14307). An ImageNet MAE (``facebook/vit-mae-base`` with its decoder) sees each test
image under ``n_masks`` random masks hiding ``mask_ratio`` of its 16x16 patches and reconstructs the hidden
patches. Normal structure is easy to inpaint from its surroundings; a defect is not. The anomaly map is
the per-pixel squared reconstruction error in pixel space, averaged over the masks in which that pixel's
patch was hidden (a visible patch is never judged), lightly smoothed with a Gaussian; the image score is
the map's maximum (or the mean of its top fraction).

Implementation notes:

* Masks are drawn once per scorer from ``random_state`` and are the same for every image, so an image's
  result does not depend on the batch it comes in. They are *stratified*: each mask keeps visible the
  patches that have been visible least often so far (random tie-break), so every patch is hidden in
  ``floor`` or ``ceil`` of ``n_masks * mask_ratio`` masks and none is never judged.
* All ``B * n_masks`` masked copies of a batch run through encoder and decoder in forward passes of at
  most ``mask_batch`` copies (the masks are passed to transformers' ViTMAE as its ``noise`` argument, so
  the masking is exactly ours). ``mask_batch`` bounds peak memory; results do not depend on it.
* A model trained with ``norm_pix_loss`` predicts per-patch normalised pixels: they are mapped back with
  the mean and variance of the *target* patch (as in the MAE reference visualisation), then from the
  ImageNet normalisation to [0, 1] pixels, where the error is measured.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F

from vlad.backbones import load_backbone
from vlad.errors import InvalidParameterError, VladError
from vlad.images import LoadedImage
from vlad.ops import gaussian_blur, preprocess_batch, resize_maps, to_batch, topk_mean
from vlad import paramspec as ps
from vlad.scorers.base import BaseScorer

logger = logging.getLogger(__name__)

SCORE_MODES = ("max", "topk")
LARGE_IMAGE_MODES = ("resize", "tile")


def stratified_masks(n_masks: int, n_patches: int, n_hidden: int, generator: torch.Generator) -> torch.Tensor:
    """Random masks that together hide every patch about equally often.

    Mask ``j`` keeps visible the ``n_patches - n_hidden`` patches seen least often in masks ``0..j-1``
    (ties broken at random), so each patch is hidden in ``floor`` or ``ceil`` of
    ``n_masks * n_hidden / n_patches`` masks.

    Args:
        n_masks: number of masks ``N``.
        n_patches: patches per image ``L``.
        n_hidden: patches hidden by each mask.
        generator: seeded torch generator.

    Returns:
        bool ``(N, L)``, True where the patch is hidden.

    Raises:
        ValueError: the masks cannot hide every patch at least once.
    """
    n_keep = n_patches - n_hidden
    if n_hidden < 1 or n_keep < 1:
        raise InvalidParameterError(
            f"each mask must hide at least one patch and keep at least one visible; got {n_hidden} hidden "
            f"of {n_patches} patches. Fix: use a mask_ratio strictly between 0 and 1 (MAEDAY uses 0.75)."
        )
    if n_masks * n_hidden < n_patches:
        need = math.ceil(n_patches / n_hidden)
        raise InvalidParameterError(
            f"{n_masks} masks hiding {n_hidden} of {n_patches} patches each cannot hide every patch; "
            f"Fix: use n_masks >= {need} (MAEDAY uses 32) or a larger mask_ratio."
        )
    visible_count = torch.zeros(n_patches)
    hidden = torch.ones(n_masks, n_patches, dtype=torch.bool)
    for j in range(n_masks):
        order = torch.argsort(visible_count + torch.rand(n_patches, generator=generator))
        keep = order[:n_keep]
        hidden[j, keep] = False
        visible_count[keep] += 1
    return hidden


def masks_to_noise(hidden: torch.Tensor) -> torch.Tensor:
    """ViTMAE ``noise`` ``(N, L)`` that makes it keep exactly the visible patches of ``hidden`` ``(N, L)``.

    ViTMAE keeps the patches with the lowest noise; visible patches get noise in [0, 1), hidden ones
    in [1, 2), both increasing with the patch index (a deterministic order).
    """
    n, length = hidden.shape
    ramp = torch.arange(length, dtype=torch.float32) / length
    return hidden.float() + ramp.expand(n, length)


class MAEDAY(BaseScorer):
    """Zero-shot anomaly maps from masked-autoencoder reconstruction errors (MAEDAY, arXiv:2211.14307).

    ``fit()`` needs no images (``fit(None)`` works); it builds the MAE and draws the masks.

    Args:
        backbone: a transformers ViTMAE weight name with its decoder (default ``facebook/vit-mae-base``).
        weights: ``"pretrained"``, ``"random"``, ``"tiny"`` or a path to local weights.
        device: torch device, or ``"auto"``.
        batch_size: images per :meth:`predict` step; each image becomes ``n_masks`` masked copies.
        n_masks: masks per image (the paper's ``N = 32``).
        mask_ratio: fraction of patches each mask hides (0.75, as in MAE pre-training).
        mask_batch: at most this many masked copies per forward pass; bounds peak memory. Measured on
            CPU at 224 px with ViT-MAE-Base: 32 copies add ~0.36 GB peak RSS over the ~0.66 GB model,
            8 copies ~0.16 GB. Results do not depend on it (up to float rounding).
        sigma: standard deviation, in pixels of the ``image_size`` map, of the light Gaussian smoothing of
            the map (0 turns it off). The default 4 px at 224 px (a quarter of a patch) softens the
            16 px patch seams without blurring small defects away.
        score: image score from the map: ``"max"`` (the paper) or ``"topk"`` (mean of the top
            ``topk`` fraction of map pixels, steadier against single hot pixels).
        topk: fraction of pixels averaged when ``score="topk"``.
        image_size: side of the square the image is resized to; None uses the backbone's own (224 px
            for ``facebook/vit-mae-base``). Must be a multiple of the patch size (16); other sizes
            interpolate the position embeddings (the MAE was trained at 224).
        large_images: how images of another size are handled. ``"resize"``: the whole image is resized to
            ``image_size`` (one tile; small defects in very large images shrink with it). ``"tile"``:
            the image keeps its resolution (images whose shorter side is below ``image_size`` are first
            upscaled to it, aspect kept) and is cut into ``image_size`` tiles, overlapping where the
            size is not a multiple; tile maps are stitched (mean over overlaps) and smoothed, and the
            score is taken from the stitched map. Cost grows with the number of tiles. In a batch of
            images of different sizes the stitched maps are brought to one size for the batch (then
            back to each image's own size), so ``batch_size=1`` keeps them exact.
        random_state: seed of the masks and of a ``weights="random"`` backbone.
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"``: the pretrained backbone's forwards run
            under autocast at that dtype and their outputs are cast to float32 before anything else
            (:mod:`vlad.precision`).
    """

    requires_references = False

    #: what each parameter accepts (see vlad.paramspec; device, batch_size, ... are BaseScorer's)
    _param_specs = {
        "n_masks": ps.Int(1, 4096).explain("MAEDAY uses 32"),
        "mask_ratio": ps.Number(0, 1, lo_open=True, hi_open=True).explain("MAEDAY uses 0.75"),
        "mask_batch": ps.Int(1, 4096),
        "score": ps.Choice(*SCORE_MODES),
        "topk": ps.Number(0, 1, lo_open=True),
        "image_size": ps.SQUARE_IMAGE_SIZE,
        "large_images": ps.Choice(*LARGE_IMAGE_MODES),
        "random_state": ps.SEED,
    }

    def __init__(
        self,
        backbone: str = "facebook/vit-mae-base",
        weights: str = "pretrained",
        device: str = "cpu",
        batch_size: int = 1,
        n_masks: int = 32,
        mask_ratio: float = 0.75,
        mask_batch: int = 32,
        sigma: float = 4.0,
        score: str = "max",
        topk: float = 0.01,
        image_size: int | None = None,
        large_images: str = "resize",
        random_state: int = 0,
        precision: str = "fp32",
    ) -> None:
        self.backbone = backbone
        self.weights = weights
        self.device = device
        self.batch_size = batch_size
        self.n_masks = n_masks
        self.mask_ratio = mask_ratio
        self.mask_batch = mask_batch
        self.sigma = sigma
        self.score = score
        self.topk = topk
        self.image_size = image_size
        self.large_images = large_images
        self.random_state = random_state
        self.precision = precision

    # -- building -----------------------------------------------------------------------------
    def _check_params(self) -> None:
        if self.score not in SCORE_MODES:
            raise InvalidParameterError(f"score must be one of {SCORE_MODES}, got {self.score!r}")
        if self.large_images not in LARGE_IMAGE_MODES:
            raise InvalidParameterError(
                f"large_images must be one of {LARGE_IMAGE_MODES}, got {self.large_images!r}"
            )
        if not 0.0 < float(self.mask_ratio) < 1.0:
            raise InvalidParameterError(f"mask_ratio must be in (0, 1), got {self.mask_ratio!r}; MAEDAY uses 0.75")
        if int(self.n_masks) < 1 or int(self.mask_batch) < 1:
            raise InvalidParameterError(
                f"n_masks and mask_batch must be positive integers, got {self.n_masks!r} and {self.mask_batch!r}"
            )
        if self.score == "topk" and not 0.0 < float(self.topk) <= 1.0:
            raise InvalidParameterError(f"topk must be a fraction in (0, 1], got {self.topk!r}")
        if float(self.sigma) < 0:
            raise InvalidParameterError(f"sigma must be >= 0 (0 disables smoothing), got {self.sigma!r}")

    def _build(self) -> None:
        self._check_params()
        bb = load_backbone(self.backbone, self.weights, self.device_, seed=self.weights_seed)
        model = bb.model
        if not hasattr(model, "decoder") or not hasattr(model, "patchify") or not hasattr(model, "config"):
            raise InvalidParameterError(
                f"MAEDAY needs a masked autoencoder with its decoder (transformers ViTMAEForPreTraining); "
                f"backbone {self.backbone!r} built a {type(model).__name__}. Fix: use 'facebook/vit-mae-base'."
            )
        config = model.config
        self.preprocess_ = bb.spec.preprocess
        patch = int(config.patch_size)
        native = int(config.image_size)
        size = int(self.image_size or bb.spec.preprocess.size)
        if size % patch != 0 or size < 2 * patch:
            raise InvalidParameterError(
                f"image_size must be a multiple of the patch size {patch} and at least {2 * patch}, got {size}; "
                f"Fix: use e.g. {max(2, round(size / patch)) * patch}"
            )
        self.patch_size_ = patch
        self.image_size_ = size
        self.grid_ = size // patch
        self.n_patches_ = self.grid_ ** 2
        self.interpolate_ = size != native
        if self.interpolate_:
            _set_decoder_grid(model, native // patch, self.grid_)
        # ViTMAE hides n_patches - int(n_patches * (1 - mask_ratio)) patches; keep our masks consistent
        config.mask_ratio = float(self.mask_ratio)
        self.n_hidden_ = self.n_patches_ - int(self.n_patches_ * (1.0 - float(self.mask_ratio)))
        self.model_ = model
        self.norm_pix_ = bool(getattr(config, "norm_pix_loss", False))
        self.masks_ = None

    def _fit(self, references: list[LoadedImage] | None) -> None:
        if references:
            logger.info("MAEDAY is zero-shot: the %d reference images are not used", len(references))
        gen = torch.Generator().manual_seed(int(self.random_state))
        self.masks_ = stratified_masks(int(self.n_masks), self.n_patches_, self.n_hidden_, gen)

    # -- state --------------------------------------------------------------------------------
    def _get_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"masks": self.masks_.to(torch.uint8)}, {"grid": self.grid_, "n_hidden": self.n_hidden_}

    def _set_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        masks = tensors["masks"].bool().cpu()
        expected = (int(self.n_masks), self.n_patches_)
        if tuple(masks.shape) != expected or int(meta.get("grid", self.grid_)) != self.grid_:
            raise InvalidParameterError(
                f"saved MAEDAY masks have shape {tuple(masks.shape)} (grid {meta.get('grid')}), but the "
                f"parameters need {expected} (grid {self.grid_}); the saved folder is inconsistent: re-save it"
            )
        self.masks_ = masks

    # -- prediction ---------------------------------------------------------------------------
    def _reconstruct(self, pixels: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One masked forward pass through encoder and decoder.

        Args:
            pixels: normalised images ``(M, 3, S, S)`` (one per masked copy).
            noise: ViTMAE masking noise ``(M, L)``.

        Returns:
            ``(logits, hidden)``: the decoder's patch predictions ``(M, L, p*p*3)`` (normalised per patch
            when the model uses ``norm_pix_loss``) and the mask it applied ``(M, L)`` (1 = hidden).
        """
        with self._autocast():
            out = self.model_(pixel_values=pixels, noise=noise, interpolate_pos_encoding=self.interpolate_)
        return out.logits.float(), out.mask

    def _to_pixels(self, patches: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised patches ``(..., p*p*3)`` (channel last) -> [0, 1] pixels."""
        mean = torch.tensor(self.preprocess_.mean, device=patches.device, dtype=patches.dtype)
        std = torch.tensor(self.preprocess_.std, device=patches.device, dtype=patches.dtype)
        shape = patches.shape
        return (patches.reshape(*shape[:-1], -1, 3) * std + mean).reshape(shape)

    def error_maps(self, pixels: torch.Tensor) -> torch.Tensor:
        """Raw (unsmoothed) MAEDAY maps of preprocessed images.

        Args:
            pixels: ImageNet-normalised images ``(B, 3, S, S)``, ``S = image_size``.

        Returns:
            ``(B, S, S)``: per pixel, the squared error in [0, 1] pixel space (mean over colour channels)
            averaged over the masks that hid its patch.
        """
        self._check_fitted()
        b, n = pixels.shape[0], self.masks_.shape[0]
        device = pixels.device
        hidden_all = self.masks_.to(device)
        noise_all = masks_to_noise(self.masks_).to(device)
        targets = self.model_.patchify(pixels, interpolate_pos_encoding=True)  # (B, L, p*p*3)
        p2 = self.patch_size_ ** 2
        err_sum = torch.zeros(b, self.n_patches_, p2, device=device)
        step = int(self.mask_batch)
        for start in range(0, b * n, step):
            idx = torch.arange(start, min(start + step, b * n), device=device)
            img_idx, mask_idx = idx // n, idx % n
            logits, applied = self._reconstruct(pixels[img_idx], noise_all[mask_idx])
            hidden = hidden_all[mask_idx]
            if not torch.equal(applied.bool(), hidden):
                raise VladError(
                    "the MAE hid other patches than the ones asked for; this transformers version handles "
                    "the `noise` argument differently (expected: lowest noise kept). Please report it."
                )
            target = targets[img_idx]
            if self.norm_pix_:
                mu = target.mean(dim=-1, keepdim=True)
                var = target.var(dim=-1, keepdim=True)
                logits = logits * (var + 1.0e-6) ** 0.5 + mu
            recon = self._to_pixels(logits).clamp(0.0, 1.0)
            truth = self._to_pixels(target)
            err = (recon - truth).pow(2).reshape(*recon.shape[:2], p2, 3).mean(dim=-1)  # (M, L, p*p)
            err = err * hidden[..., None].to(err.dtype)
            err_sum.index_add_(0, img_idx, err)
        counts = hidden_all.sum(dim=0).to(err_sum.dtype)  # (L,), >= 1 by construction
        err_mean = err_sum / counts[None, :, None]
        g, p = self.grid_, self.patch_size_
        return err_mean.reshape(b, g, g, p, p).permute(0, 1, 3, 2, 4).reshape(b, g * p, g * p)

    def _predict_batch(self, images: list[LoadedImage]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.large_images == "tile":
            return self._predict_tiled(images)
        pixels = preprocess_batch(images, self.preprocess_, self.device_, size=self.image_size_)
        maps = gaussian_blur(self.error_maps(pixels), float(self.sigma))
        return self._scores(maps), maps

    def _scores(self, maps: torch.Tensor) -> torch.Tensor:
        flat = maps.flatten(1)
        return flat.max(dim=1).values if self.score == "max" else topk_mean(flat, float(self.topk))

    def _predict_tiled(self, images: list[LoadedImage]) -> tuple[torch.Tensor, torch.Tensor]:
        size, pre = self.image_size_, self.preprocess_
        tiles, boxes, shapes = [], [], []
        for i, img in enumerate(images):
            h, w = img.size
            scale = max(1.0, size / min(h, w))
            hh, ww = max(size, round(h * scale)), max(size, round(w * scale))
            x = to_batch([img], (hh, ww), pre.mean, pre.std, self.device_, pre.interpolation)[0]
            shapes.append((hh, ww))
            for y0 in _tile_starts(hh, size):
                for x0 in _tile_starts(ww, size):
                    tiles.append(x[:, y0 : y0 + size, x0 : x0 + size])
                    boxes.append((i, y0, x0))
        errors = self.error_maps(torch.stack(tiles))  # (T, S, S)
        out_h, out_w = max(s[0] for s in shapes), max(s[1] for s in shapes)
        scores, maps = [], []
        for i, (hh, ww) in enumerate(shapes):
            total = torch.zeros(hh, ww, device=errors.device)
            count = torch.zeros(hh, ww, device=errors.device)
            for err, (owner, y0, x0) in zip(errors, boxes):
                if owner == i:
                    total[y0 : y0 + size, x0 : x0 + size] += err
                    count[y0 : y0 + size, x0 : x0 + size] += 1
            stitched = gaussian_blur((total / count)[None], float(self.sigma))
            scores.append(self._scores(stitched))
            maps.append(resize_maps(stitched, (out_h, out_w))[0])
        return torch.cat(scores), torch.stack(maps)


def _tile_starts(length: int, size: int) -> list[int]:
    """Top/left offsets of ``size`` tiles covering ``length`` pixels, evenly spread (last one at the border)."""
    n = math.ceil(length / size)
    if n == 1:
        return [0]
    return [round(k * (length - size) / (n - 1)) for k in range(n)]


def interpolate_grid_pos(pos: torch.Tensor, native_grid: int, grid: int) -> torch.Tensor:
    """Resample ``(1, 1 + native_grid**2, D)`` position embeddings (class token first) to a ``grid`` x ``grid``
    patch layout with 2-D bicubic interpolation: ``(1, 1 + grid**2, D)``."""
    dim = pos.shape[-1]
    patch_pos = pos[:, 1:].reshape(1, native_grid, native_grid, dim).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, size=(grid, grid), mode="bicubic", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)
    return torch.cat([pos[:, :1], patch_pos], dim=1)


def _set_decoder_grid(model: torch.nn.Module, native_grid: int, grid: int) -> None:
    """Give the decoder position embeddings for a ``grid`` x ``grid`` patch layout (2-D bicubic).

    transformers' decoder ``interpolate_pos_encoding`` resamples the flattened sequence in 1-D, which
    mixes rows; we resample in 2-D once here (as its encoder does), after which the decoder's own 1-D
    resampling maps a sequence to one of the same length: the identity.
    """
    new = interpolate_grid_pos(model.decoder.decoder_pos_embed.data, native_grid, grid)
    model.decoder.decoder_pos_embed = torch.nn.Parameter(new, requires_grad=False)
