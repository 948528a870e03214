"""How a camera frame becomes cross-attention K/V: letterbox on the host, then the vision
path on the device (docs/model.md section 4.2), on an encoder stream of its own on CUDA.

:class:`FrameEncoder` owns that stream and the encoder's CUDA graph; the encoder thread
(:mod:`.encoder`) and the offline path call it through :meth:`.runner.ModelRunner.encode_frames`.
"""
from dataclasses import dataclass
from typing import List, Sequence

import numpy as np
import torch

from .preprocess import letterbox, normalize_tiles


@dataclass
class EncodedFrame:
    """A frame after the vision tower, projector and cross k/v projections.

    :ivar keys: (num_cross_layers, num_kv_heads, T, head_dim), before RoPE and k_norm; on
        CUDA made on the encoder stream, and complete (:meth:`FrameEncoder.encode` returns
        once the encode has run).
    :ivar values: same shape.
    """

    keys: torch.Tensor
    values: torch.Tensor
    frame_index: int = -1


class FrameEncoder:
    """Encodes chunks of RGB frames with ``model`` (a :class:`~.moss_video.MossVideoModel`).

    :param model: the model; its vision config gives the tile size (``tile_px``, pixels).
    :param device: 'cpu' or 'cuda[:N]'; on CUDA the device work runs on :attr:`stream`.
    """

    def __init__(self, model, device: str) -> None:
        self.model = model
        self.tile_px = model.vision_config.image_size
        self.stream = (torch.cuda.Stream(device=device) if device.startswith('cuda')
                       else None)
        self.graph = None  # graphs.EncoderGraph once captured

    def capture_graph(self) -> None:
        """Capture the one-frame encode as a CUDA graph (:class:`~.graphs.EncoderGraph`);
        exceptions of the capture propagate to the caller."""
        if self.graph is None:
            from .graphs import EncoderGraph
            self.graph = EncoderGraph(self.model, self.tile_px)

    def tiles(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """RGB uint8 images (H, W, 3) -> letterboxed uint8 tiles (N, tile, tile, 3) on the host
        (the processor's resize and pad, :func:`~.preprocess.letterbox`)."""
        return np.stack([letterbox(im, self.tile_px) for im in images])

    def pixel_values(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """RGB uint8 images -> normalized tensor (N, 3, tile, tile) on the model device, in the
        model dtype (the stock processor's output, docs/model.md section 4.2 step 1)."""
        tiles = torch.from_numpy(self.tiles(images)).to(self.model.device)
        return normalize_tiles(tiles).to(self.model.dtype)

    @torch.no_grad()
    def encode(self, images: Sequence[np.ndarray]) -> List[EncodedFrame]:
        """Letterbox on the host, then normalization, vision tower, pooling, projector and
        cross k/v on the device, for a chunk of frames: one :class:`EncodedFrame` each.

        On CUDA the device work runs on :attr:`stream` (replaying the encoder's CUDA graph
        when captured), beside decoding on the default stream, and this call returns once it
        has completed: an engine inserts only finished frames and its decode never waits for
        the encoder (docs/model.md section 10.4).
        """
        tiles = self.tiles(images)
        if self.stream is None:
            return _split(*self.model.encode_tiles(torch.from_numpy(tiles)))
        with torch.cuda.stream(self.stream):
            if self.graph is not None:
                frames = [_split(*self.graph.encode(tile))[0] for tile in tiles]
            else:
                device_tiles = torch.from_numpy(tiles).pin_memory().to(self.model.device,
                                                                       non_blocking=True)
                frames = _split(*self.model.encode_tiles(device_tiles))
            done = torch.cuda.Event()
            done.record(self.stream)
        done.synchronize()  # this (encoder) thread waits, not the decode stream
        return frames


def _split(keys: torch.Tensor, values: torch.Tensor) -> List[EncodedFrame]:
    """(L, N, kv_heads, T, hd) keys and values -> one EncodedFrame per frame."""
    return [EncodedFrame(keys[:, i].contiguous(), values[:, i].contiguous())
            for i in range(keys.shape[1])]
