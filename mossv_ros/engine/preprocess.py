"""Frame pre-processing: one 560x560 tile per frame, as transformers' ``MllamaImageProcessor``
with ``max_image_tiles=1`` prepares it (docs/model.md section 4.2 step 1).

The real checkpoint was trained on frames prepared by that processor, so the steps and their
arithmetic are its own: the frame is resized with PIL bilinear resampling (aspect ratio kept,
the longer side to the tile; smaller frames are enlarged), zero-padded at the bottom/right
*before* normalization (so the pad becomes -mean/std), rescaled by 1/255 and normalized with
the CLIP mean/std of the Llama-3.2-Vision ``preprocessor_config.json``. ``test_preprocess.py``
checks it against the processor itself on real video frames.
"""
import math

import numpy as np

#: CLIP normalization constants (docs/model.md section 4.2 step 1).
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def fit_size(height: int, width: int, tile_px: int):
    """(new_height, new_width) of a frame fitted to one ``tile_px`` square tile, aspect kept:
    the side with the smaller scale becomes ``tile_px``, the other is floored (at least 1).
    The rule of transformers' ``mllama.get_image_size_fit_to_canvas`` for a 1-tile canvas."""
    scale_h, scale_w = tile_px / height, tile_px / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, tile_px), tile_px
    return tile_px, min(math.floor(width * scale_h) or 1, tile_px)


def letterbox(image: np.ndarray, tile_px: int) -> np.ndarray:
    """Resize (PIL bilinear) and zero-pad an RGB uint8 image to (tile_px, tile_px, 3) uint8.

    :param image: uint8 array (height, width, 3), RGB.
    :raises ValueError: wrong shape or dtype, or an empty image.
    """
    from PIL import Image

    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f'expected uint8 (H, W, 3) RGB, got {image.dtype} {image.shape}')
    height, width = image.shape[:2]
    if height == 0 or width == 0:
        raise ValueError('empty image')
    new_h, new_w = fit_size(height, width, tile_px)
    out = np.zeros((tile_px, tile_px, 3), dtype=np.uint8)
    if (new_h, new_w) == (height, width):
        out[:height, :width] = image
    else:
        resized = Image.fromarray(np.ascontiguousarray(image)).resize(
            (new_w, new_h), resample=Image.Resampling.BILINEAR, reducing_gap=None)
        out[:new_h, :new_w] = np.asarray(resized)
    return out


def normalize_tiles(tiles):
    """Letterboxed uint8 tiles -> CLIP-normalized float32, on whatever device they are.

    The arithmetic of the processor, in float32: rescale by 1/255, subtract the mean, divide by
    the std (the processor multiplies in float64 and casts: the two differ by at most one
    float32 ulp, about 1e-7, on 126 of the 256 grey levels; float32 keeps the shipped toyworld
    checkpoint bit-for-bit reproducible, README, toyworld). Device tensor arithmetic only, so
    the runner does it on the GPU inside the encoder's CUDA graph.

    :param tiles: uint8 tensor (N, tile_px, tile_px, 3), RGB (:func:`letterbox`).
    :returns: float32 tensor (N, 3, tile_px, tile_px) on the same device.
    """
    import torch

    mean, std = _clip_constants(tiles.device)
    x = (tiles.to(torch.float32) * (1.0 / 255.0) - mean) / std
    return x.permute(0, 3, 1, 2)


_CLIP_ON_DEVICE: dict = {}


def _clip_constants(device):
    """The CLIP mean and std as float32 tensors on ``device``, made once (a CUDA graph
    replays the arithmetic but cannot record their copy to the device)."""
    import torch

    if device not in _CLIP_ON_DEVICE:
        _CLIP_ON_DEVICE[device] = (torch.as_tensor(CLIP_MEAN).to(device),
                                   torch.as_tensor(CLIP_STD).to(device))
    return _CLIP_ON_DEVICE[device]


def to_pixel_values(image: np.ndarray, tile_px: int) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> float32 (3, tile_px, tile_px), CLIP-normalized: :func:`letterbox`
    then :func:`normalize_tiles`, the runner's two steps, on the host."""
    import torch

    tile = torch.from_numpy(letterbox(image, tile_px)[None])
    return np.ascontiguousarray(normalize_tiles(tile)[0].numpy())
