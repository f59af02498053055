"""CLIP-ES (Lin et al., CVPR 2023): softmax-GradCAM + class-aware attention affinity, on open_clip.

The published code (``linyq2117/CLIP-ES``: ``generate_cams_voc12.py``, ``clip/model.py``,
``pytorch_grad_cam/``, ``utils.py``, ``eval_cam.py``) decides every detail here; where it does
something unusual, the comment says so. Per image:

1. resize to the original size with each side rounded *up* to a multiple of 16 (one scale, no
   flip: the VOC/COCO scripts build ``scales=[1.0]`` plus a flip and keep only the first image);
2. run the ViT to the input of its last block without gradients, keeping each block's
   head-averaged attention; run the last block with the gradient of its ``ln_1`` output;
3. image feature = mean of the patch tokens after ``ln_post``, then ``proj``; softmax over the
   cosine logits (times ``logit_scale.exp()``) of the image's tags *and the whole background list*;
4. per tag: Grad-CAM at ``ln_1`` (channel weights = mean gradient over the patch grid, ReLU,
   min-max scaled twice as ``pytorch_grad_cam`` does);
5. CAA: mean attention of the last 8 blocks (patch rows/columns only), 3 Sinkhorn rounds
   (columns then rows), symmetrised, squared, its columns masked by the boxes ``scoremap2bbox``
   finds around the CAM above ``box_threshold`` (0.4 VOC, 0.7 COCO), applied to the CAM;
   min-max scaled, then bilinearly resized to the original image size.

Shapes: L = 1 + h*w tokens (class token first), D width, E embedding dim, T = C tags + background
classes. Everything is a function of tensors and an open_clip model; nothing holds state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from pipeline.clip_es_prompts import TEMPLATE
from pipeline.cliper import _heads, _tokens
from pipeline.types import IGNORE, check_class_ids

if TYPE_CHECKING:
    from pipeline.models import ClipModels

_CAM_EPS = 1e-7  # pytorch_grad_cam's scale_cam_image: x / (1e-7 + max); its value moves the uint8 threshold
CAA_LAYERS = 8  # attention of the last 8 blocks
SINKHORN_ROUNDS = 3  # one column/row normalisation, then ``for _ in range(2)`` more
CAA_POWER = 2  # ``for _ in range(1): trans_mat = trans_mat @ trans_mat``
BG_EXPONENT = 2  # eval_cam.py ``--cam_eval_thres`` default (its sweep for attn maps tries 1 and 2)


@dataclass(frozen=True)
class ClipEsOutput:
    """One image's CLIP-ES maps, one entry per tag (in the order given).

    cam: [C, h, w] float32 Grad-CAM at token resolution, 0..1 (min-max scaled as published);
    box_mask: [C, h, w] bool, the patches inside ``scoremap2bbox``'s boxes (the CAA column mask);
    refined: [C, H, W] float32 CAA-refined map at the original image size, 0..1;
    scores: [C] float32 softmax probability of each tag among tags + background classes;
    tokens: [h, w, E] final-layer patch features when asked for (``ClipEsForward.tokens``).
    """

    cam: torch.Tensor
    box_mask: torch.Tensor
    refined: torch.Tensor
    scores: torch.Tensor
    tokens: torch.Tensor | None = None


@dataclass(frozen=True)
class ClipEsForward:
    """What one forward/backward pass of CLIP-ES yields for one image.

    activations: [h*w, D] float32 last-block ln_1 output at the patch tokens (row-major grid);
    gradients: [C, h*w, D] float32 d(softmax prob of tag c) / d activations;
    attention: [h*w, h*w] float32 head-averaged patch-to-patch attention, mean of the last 8 blocks;
    scores: [C] float32 softmax probabilities of the tags (among tags + background); grid: (h, w);
    tokens: [h, w, E] float32 L2-normalised final-layer patch features (ln_post, proj), only when
    asked for (discovery), else None.
    """

    activations: torch.Tensor
    gradients: torch.Tensor
    attention: torch.Tensor
    scores: torch.Tensor
    grid: tuple[int, int]
    tokens: torch.Tensor | None = None


def input_size(width: int, height: int, patch: int = 16) -> tuple[int, int]:
    """(W', H'): each side rounded up to a multiple of ``patch`` (``np.ceil(side / 16) * 16``)."""
    if width < 1 or height < 1:
        raise ValueError(f"image size {width}x{height} has an empty side")
    return math.ceil(width / patch) * patch, math.ceil(height / patch) * patch


def clip_es_input(image: np.ndarray, patch: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """HWC uint8 RGB -> [3, H', W'] float32: PIL bicubic resize to ``input_size``, then CLIP's
    mean/std (torchvision's ``Resize`` on a PIL image is this PIL call)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HWC uint8 RGB image, got shape {image.shape} dtype {image.dtype}")
    h, w = image.shape[:2]
    resized = np.asarray(Image.fromarray(image).resize(input_size(w, h, patch), Image.Resampling.BICUBIC))
    x = torch.from_numpy(resized.copy()).permute(2, 0, 1).float() / 255.0
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (x - m) / s


@torch.no_grad()
def text_features(model: Any, tokenizer: Any, prompts: Sequence[str], template: str = TEMPLATE) -> torch.Tensor:
    """[T, E] float32 unit-norm text embeddings of ``template.format(p)`` (``zeroshot_classifier``
    with one template: normalise, mean over templates, normalise). Each prompt is encoded on its
    own, as the published loop does, so a row does not depend on which prompts share the call
    (callers may cache rows per prompt)."""
    if not prompts:
        raise ValueError("no prompts to embed: give at least one class or background name")
    device = next(model.parameters()).device
    emb = torch.cat([model.encode_text(tokenizer([template.format(p)]).to(device)).float() for p in prompts])
    emb = emb / emb.norm(dim=-1, keepdim=True)
    return emb / emb.norm(dim=-1, keepdim=True)


def scale_cam(cam: np.ndarray) -> np.ndarray:
    """pytorch_grad_cam's ``scale_cam_image`` on one float32 map: (x - min) / (1e-7 + max)."""
    cam = cam - np.min(cam)
    return (cam / (_CAM_EPS + np.max(cam))).astype(np.float32)


def grad_cam(activations: torch.Tensor, gradients: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """[h*w, D] patch activations and gradients (row-major grid) -> [h, w] float32 Grad-CAM:
    channel weights = mean gradient over the grid, weighted sum over channels, ReLU, then
    min-max scaled twice (once per layer, once after averaging the one target layer)."""
    act = activations.float().T.reshape(-1, *grid).cpu().numpy()  # [D, h, w], reshape_transform's layout
    grad = gradients.float().T.reshape(-1, *grid).cpu().numpy()
    weights = np.mean(grad, axis=(1, 2))
    cam = np.maximum((weights[:, None, None] * act).sum(axis=0), 0).astype(np.float32)
    return scale_cam(np.maximum(scale_cam(cam), 0))


def score_boxes(scoremap: np.ndarray, threshold: float) -> list[tuple[int, int, int, int]]:
    """``scoremap2bbox(multi_contour_eval=True)``: (x0, y0, x1, y1) per region of the [h, w] map.

    The map becomes uint8 by truncation (``(m * 255).astype(uint8)``), is kept where strictly
    above ``int(threshold * its uint8 max)``, and each 8-connected region gives its bounding box
    with the end *clipped to width-1 / height-1* (so a region touching the right or bottom edge
    loses that column or row when the box is used as ``[y0:y1, x0:x1]``). OpenCV's RETR_TREE also
    returns hole contours; their boxes lie inside their region's box, so leaving them out does not
    change the mask. No region gives the single box (0, 0, 0, 0)."""
    h, w = scoremap.shape
    gray = (scoremap * 255).astype(np.uint8)
    fg = gray > int(threshold * np.max(gray))
    labels, n = ndimage.label(fg, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return [(0, 0, 0, 0)]
    boxes = []
    for ys, xs in ndimage.find_objects(labels):
        boxes.append((xs.start, ys.start, min(xs.stop, w - 1), min(ys.stop, h - 1)))
    return boxes


def box_mask(scoremap: np.ndarray, threshold: float) -> np.ndarray:
    """[h, w] bool: the union of ``score_boxes`` used as ``mask[y0:y1, x0:x1] = 1``."""
    mask = np.zeros(scoremap.shape, dtype=bool)
    for x0, y0, x1, y1 in score_boxes(scoremap, threshold):
        mask[y0:y1, x0:x1] = True
    return mask


def caa_transition(attn: torch.Tensor, rounds: int = SINKHORN_ROUNDS, power: int = CAA_POWER) -> torch.Tensor:
    """[n, n] mean patch attention -> the CAA transition matrix: ``rounds`` Sinkhorn rounds
    (divide by column sums, then by row sums), symmetrised (T + T^T) / 2, raised to ``power``."""
    t = attn.float()
    for _ in range(rounds):
        t = t / t.sum(dim=0, keepdim=True)
        t = t / t.sum(dim=1, keepdim=True)
    t = (t + t.T) / 2
    out = t
    for _ in range(power - 1):
        out = out @ t
    return out


def caa_refine(transition: torch.Tensor, cam: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[h, w] float32 refined CAM: (transition with its columns outside ``mask`` zeroed) @ cam."""
    t = transition * torch.from_numpy(mask.reshape(1, -1).astype(np.float32)).to(transition.device)
    refined = t @ torch.from_numpy(cam.reshape(-1, 1)).to(transition.device)
    return refined.reshape(cam.shape).cpu().numpy().astype(np.float32)


def upscale(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[h, w] -> [H, W] float32 for ``size`` (H, W): min-max scaled, then bilinear with half-pixel
    centres and no antialiasing (``cv2.resize`` INTER_LINEAR, which ``scale_cam_image`` calls)."""
    x = torch.from_numpy(scale_cam(cam))[None, None]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def _attend(block: Any, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """nn.MultiheadAttention of one block on its ln_1 output y [1, L, D]: (output, probs [1, heads, L, L])."""
    attn = block.attn
    if not isinstance(attn, torch.nn.MultiheadAttention):
        raise TypeError(f"unsupported attention module {type(attn).__name__}; CLIP-ES needs nn.MultiheadAttention")
    q, k, v = (_heads(t, attn.num_heads) for t in F.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1))
    probs = torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)
    return attn.out_proj((probs @ v).transpose(1, 2).reshape(y.shape)), probs


def _block(block: Any, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One residual block from its input x and ln_1(x) = y: (output, head-averaged attention [1, L, L])."""
    out, probs = _attend(block, y)
    x = x + block.ls_1(out)
    return x + block.ls_2(block.mlp(block.ln_2(x))), probs.mean(dim=1)


def _image_probs(model: Any, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Last-block output [1, L, D] -> [1, T] softmax over cosine logits (``forward_last_layer``)."""
    visual = model.visual
    feat = visual.ln_post(x)[:, 1:].mean(dim=1)  # mean of the patch tokens, before proj as published
    if visual.proj is not None:
        feat = feat @ visual.proj
    feat = feat.float() / feat.float().norm(dim=1, keepdim=True)
    t = text.float() / text.float().norm(dim=1, keepdim=True)
    return (model.logit_scale.exp().float() * feat @ t.T).softmax(dim=-1)


@torch.no_grad()
def _patch_tokens(visual: Any, out: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Last-block output [1, L, D] -> [h, w, E] L2-normalised projected patch tokens."""
    feat = visual.ln_post(out.detach())[0, 1:]
    if visual.proj is not None:
        feat = feat @ visual.proj
    feat = feat.float()
    return (feat / feat.norm(dim=-1, keepdim=True).clamp_min(1e-12)).reshape(*grid, -1)


def clip_es_forward(
    model: Any, pixels: torch.Tensor, text: torch.Tensor, n_fg: int, dense_tokens: bool = False
) -> ClipEsForward:
    """The model passes of CLIP-ES for ``pixels`` [1, 3, H', W'] (``clip_es_input``) and ``text``
    [T, E] whose first ``n_fg`` rows are the image's tags and the rest the background classes.
    Blocks before the last run without gradients, as published; gradients are taken locally even
    when the caller runs under ``torch.no_grad``. ``dense_tokens``: also return the final-layer
    patch features (one projection of the output already computed; no extra model pass)."""
    if pixels.ndim != 4 or pixels.shape[0] != 1:
        raise ValueError(f"CLIP-ES takes one image at a time ([1, 3, H, W]), got {tuple(pixels.shape)}")
    if not 0 <= n_fg <= text.shape[0]:
        raise ValueError(f"n_fg={n_fg} tags but only {text.shape[0]} text rows")
    visual = model.visual
    blocks = list(visual.transformer.resblocks)
    patch = int(visual.conv1.stride[0])
    grid = (int(pixels.shape[-2]) // patch, int(pixels.shape[-1]) // patch)
    with torch.no_grad():
        x = _tokens(visual, pixels.to(next(model.parameters()).device))
        attns = []
        for block in blocks[:-1]:
            x, a = _block(block, x, block.ln_1(x))
            attns.append(a[0])
    with torch.enable_grad():
        y = blocks[-1].ln_1(x).detach().requires_grad_(True)
        out, a = _block(blocks[-1], x, y)
        probs = _image_probs(model, out, text.to(x.device))
        attns.append(a[0].detach())
        grads = [torch.autograd.grad(probs[0, c], y, retain_graph=True)[0][0, 1:] for c in range(n_fg)]
        tokens = _patch_tokens(visual, out, grid) if dense_tokens else None
    d = y.shape[-1]
    return ClipEsForward(
        activations=y.detach()[0, 1:].float(),
        gradients=torch.stack(grads).float() if grads else torch.zeros(0, grid[0] * grid[1], d),
        attention=torch.stack([a[1:, 1:].float() for a in attns[-CAA_LAYERS:]]).mean(dim=0),
        scores=probs.detach()[0, :n_fg].float(),
        grid=grid,
        tokens=tokens,
    )


def clip_es_from_text(
    model: Any,
    pixels: torch.Tensor,
    text: torch.Tensor,
    n_fg: int,
    size: tuple[int, int],
    box_threshold: float = 0.4,
    dense_tokens: bool = False,
) -> ClipEsOutput:
    """CLIP-ES maps of one image (see ``clip_es_forward`` for the inputs); ``size`` (H, W) of the
    original image, which the refined maps are resized to."""
    fwd = clip_es_forward(model, pixels, text, n_fg, dense_tokens)
    transition = caa_transition(fwd.attention)
    cams, masks, refined = [], [], []
    for g in fwd.gradients:
        cam = grad_cam(fwd.activations, g, fwd.grid)
        mask = box_mask(cam, box_threshold)
        cams.append(cam)
        masks.append(mask)
        refined.append(upscale(caa_refine(transition, cam, mask), size))
    grid = fwd.grid
    return ClipEsOutput(
        cam=torch.from_numpy(np.stack(cams)) if cams else torch.zeros(0, *grid),
        box_mask=torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, *grid, dtype=torch.bool),
        refined=torch.from_numpy(np.stack(refined)) if refined else torch.zeros(0, *size),
        scores=fwd.scores.cpu(),
        tokens=fwd.tokens,
    )


def clip_es_maps(
    clip: ClipModels,
    image: np.ndarray,
    class_prompts: Sequence[str],
    background_prompts: Sequence[str],
    box_threshold: float = 0.4,
    template: str = TEMPLATE,
) -> ClipEsOutput:
    """CLIP-ES maps of an HWC uint8 RGB image for its tags, given as the published synonym names
    (``clip_es_prompts.class_prompts``), against ``background_prompts``. ``clip`` is a
    ``pipeline.models.ClipModels``. To embed the prompts once for many images, call
    ``text_features`` and ``clip_es_from_text`` directly."""
    text = text_features(clip.model, clip.tokenizer, [*class_prompts, *background_prompts], template)
    pixels = clip_es_input(image, clip.patch_size, clip.mean, clip.std)[None]
    return clip_es_from_text(clip.model, pixels, text, len(class_prompts), image.shape[:2], box_threshold)


def label_map(refined: np.ndarray, class_ids: Sequence[int], bg_exponent: float = BG_EXPONENT) -> np.ndarray:
    """eval_cam.py's pseudo mask: [C, H, W] refined maps (0..1) -> [H, W] uint8 labels.

    The maps are stored as float16 by the published code, so the rule runs in float16: the
    background score is (1 - max over classes) ** ``bg_exponent``, prepended, and the argmax picks
    the first of equal scores (background, then tags in order). ``class_ids[c]`` labels tag c."""
    if refined.ndim != 3 or refined.shape[0] != len(class_ids):
        raise ValueError(f"{len(class_ids)} class ids for maps of shape {refined.shape}")
    ids = np.asarray(class_ids, dtype=np.int64)
    check_class_ids(ids.tolist())
    if refined.shape[0] == 0:
        return np.zeros(refined.shape[1:], dtype=np.uint8)
    cams = np.asarray(refined).astype(np.float16)
    bg = np.power(1 - np.max(cams, axis=0, keepdims=True), bg_exponent).astype(np.float16)
    keys = np.concatenate([[0], ids])
    return keys[np.argmax(np.concatenate([bg, cams]), axis=0)].astype(np.uint8)


# eval_cam_with_crf.py: DenseCRF(iter_max=10, pos_xy_std=1, pos_w=3, bi_xy_std=67, bi_rgb_std=3, bi_w=4),
# background (1 - max) ** 1, pixels below 0.95 confidence set to 255 in the saved pseudo masks.
CRF_ITERATIONS = 10
CRF_GAUSSIAN = {"sxy": 1, "compat": 3}
CRF_BILATERAL = {"sxy": 67, "srgb": 3, "compat": 4}
CRF_CONFIDENCE = 0.95
CRF_BG_EXPONENT = 1
CAFFE_MEAN_BGR = (104.008, 116.669, 122.675)


def crf_image(image: np.ndarray) -> np.ndarray:
    """HWC uint8 RGB -> the HWC uint8 image the published CRF's bilateral kernel sees: BGR minus
    the Caffe mean, cast back to uint8, so negative values wrap modulo 256 (``astype(np.uint8)``
    on the mean-subtracted float image; written out here so no platform cast decides it)."""
    bgr = image[..., ::-1].astype(np.float32) - np.asarray(CAFFE_MEAN_BGR, dtype=np.float32)
    return np.ascontiguousarray((np.trunc(bgr).astype(np.int64) % 256).astype(np.uint8))


def crf_label_map(image: np.ndarray, refined: np.ndarray, class_ids: Sequence[int]) -> np.ndarray:
    """eval_cam_with_crf.py's pseudo mask: [H, W] uint8 labels from the HWC uint8 RGB ``image``
    and its [C, H, W] refined maps (float16 as stored): dense CRF on [background, tags]
    probabilities, argmax, and ``IGNORE`` where the CRF's probability is below 0.95.
    Needs ``pydensecrf2`` (``pip install tag2mask[crf]``)."""
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError as err:
        raise ImportError("the CLIP-ES dense CRF needs pydensecrf2: pip install 'tag2mask[crf]'") from err
    if image.shape[:2] != refined.shape[1:] or refined.shape[0] != len(class_ids):
        raise ValueError(f"image {image.shape} and {len(class_ids)} class ids do not fit maps of shape {refined.shape}")
    ids = np.asarray(class_ids, dtype=np.int64)
    check_class_ids(ids.tolist())
    cams = np.asarray(refined).astype(np.float16)
    bg = np.power(1 - np.max(cams, axis=0, keepdims=True), CRF_BG_EXPONENT).astype(np.float16)
    prob = np.concatenate([bg, cams])
    c, h, w = prob.shape
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(prob)))
    crf.addPairwiseGaussian(**CRF_GAUSSIAN)
    crf.addPairwiseBilateral(rgbim=crf_image(image), **CRF_BILATERAL)
    q = np.array(crf.inference(CRF_ITERATIONS)).reshape(c, h, w)
    labels = np.concatenate([[0], ids])[np.argmax(q, axis=0)]
    labels[np.max(q, axis=0) < CRF_CONFIDENCE] = IGNORE
    return labels.astype(np.uint8)
