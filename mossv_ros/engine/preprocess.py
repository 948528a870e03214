"""Frame pre-processing: one 560x560 tile per frame (moss-model.md section 4.2 step 1).

The frame is resized (bilinear, aspect preserved) to fit inside the square tile, zero-padded at
the bottom/right *before* normalization (so the pad becomes -mean/std), rescaled by 1/255 and
normalized with the CLIP mean/std of the stock Llama-3.2-Vision processor.
"""
import numpy as np

#: CLIP normalization constants (moss-model.md section 4.2 step 1).
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def fit_size(height: int, width: int, tile_px: int):
    """(new_height, new_width) that fits ``tile_px`` with the aspect ratio kept (floor)."""
    scale = min(tile_px / height, tile_px / width)
    return (min(tile_px, max(1, int(height * scale))), min(tile_px, max(1, int(width * scale))))


def letterbox(image: np.ndarray, tile_px: int) -> np.ndarray:
    """Resize and zero-pad an RGB uint8 image to (tile_px, tile_px, 3) uint8.

    :param image: uint8 array (height, width, 3), RGB.
    :raises ValueError: wrong shape or dtype, or an empty image.
    """
    import cv2

    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f'expected uint8 (H, W, 3) RGB, got {image.dtype} {image.shape}')
    height, width = image.shape[:2]
    if height == 0 or width == 0:
        raise ValueError('empty image')
    new_h, new_w = fit_size(height, width, tile_px)
    interp = cv2.INTER_AREA if new_h < height / 2 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (new_w, new_h), interpolation=interp)
    out = np.zeros((tile_px, tile_px, 3), dtype=np.uint8)
    out[:new_h, :new_w] = resized
    return out


def to_pixel_values(image: np.ndarray, tile_px: int) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> float32 (3, tile_px, tile_px), CLIP-normalized."""
    tile = letterbox(image, tile_px).astype(np.float32) * (1.0 / 255.0)
    tile = (tile - CLIP_MEAN) / CLIP_STD
    return np.ascontiguousarray(tile.transpose(2, 0, 1))
