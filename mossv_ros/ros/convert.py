"""Conversions at the ROS boundary: images in, engine events out. Translates; never decides."""
import math
import sys

import numpy as np

from ..engine import events as ev

#: Encodings converted to RGB (with rosbags-image: demosaicing, YUV, 16-bit scaled to 8-bit);
#: anything else is rejected with a reason.
SUPPORTED_ENCODINGS = (
    'rgb8', 'bgr8', 'rgba8', 'bgra8', 'mono8', 'mono16', '8UC1', '8UC3', 'rgb16', 'bgr16',
    'rgba16', 'bgra16', 'bayer_rggb8', 'bayer_bggr8', 'bayer_gbrg8', 'bayer_grbg8',
    'bayer_rggb16', 'bayer_bggr16', 'bayer_gbrg16', 'bayer_grbg16', 'yuv422', 'yuv422_yuy2')
#: Depth / float / raw-integer encodings: not camera colour images, rejected with this reason.
DEPTH_ENCODINGS = ('32FC1', '16UC1', '32FC2', '32FC3', '32FC4', '64FC1', '16SC1', '32SC1')
MAX_SIDE_PX = 8192  # larger images are rejected before decoding (bounded time and memory)
#: compressed payloads larger than this are refused unread (a 4K PNG is about 25 MB)
MAX_COMPRESSED_BYTES = 64 << 20


class ImageError(ValueError):
    """A malformed or unsupported image; ``kind`` groups errors for rate-limited logs."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def image_to_rgb(msg) -> np.ndarray:
    """``sensor_msgs/Image`` -> uint8 (H, W, 3) RGB.

    Rows may be padded (``step`` > width x channels x bytes per channel, as aligned camera
    drivers publish them): each row is read from its own ``step`` offset, as cv_bridge does.

    :raises ImageError: unsupported encoding, a step shorter than a row, size/step/data
        mismatch, empty or huge image.
    """
    if msg.width == 0 or msg.height == 0:
        raise ImageError('empty', 'image has zero width or height')
    if msg.width > MAX_SIDE_PX or msg.height > MAX_SIDE_PX:
        raise ImageError('too_large', f'{msg.width}x{msg.height} exceeds {MAX_SIDE_PX} px')
    if msg.encoding in DEPTH_ENCODINGS:
        raise ImageError('encoding', f'{msg.encoding} is a depth/float image, not a camera '
                                     'colour image (subscribe the colour topic)')
    if msg.encoding not in SUPPORTED_ENCODINGS:
        raise ImageError('encoding', f'unsupported encoding {msg.encoding!r} (supported: '
                                     f'{", ".join(SUPPORTED_ENCODINGS)})')
    if msg.step * msg.height != len(msg.data):
        raise ImageError('size', f'step*height={msg.step * msg.height} != {len(msg.data)} bytes')
    from rosbags.image.image import convert_color, to_cvtype
    try:
        _, _, typestr, channels = to_cvtype(msg.encoding)
    except Exception as exc:  # noqa: BLE001 - library errors become a counted rejection
        raise ImageError('convert', f'cannot convert {msg.encoding}: {exc}') from exc
    dtype = np.dtype(typestr)
    row_bytes = msg.width * channels * dtype.itemsize
    if msg.step < row_bytes:
        raise ImageError('size', f'step {msg.step} is shorter than a row of {msg.width} x '
                                 f'{channels} x {dtype.itemsize} = {row_bytes} bytes')
    rows = np.frombuffer(msg.data, np.uint8).reshape(msg.height, msg.step)[:, :row_bytes]
    shape = (msg.height, msg.width) + ((channels,) if channels > 1 else ())
    image = np.ascontiguousarray(rows).view(dtype).reshape(shape)
    if bool(msg.is_bigendian) != (sys.byteorder != 'little') and dtype.itemsize > 1:
        image = image.byteswap()
    try:
        # a generic one-channel 8-bit image is read as grey (rosbags-image converts no
        # generic type to a colour one)
        image = convert_color(image, 'mono8' if msg.encoding == '8UC1' else msg.encoding,
                              'rgb8')
    except Exception as exc:  # noqa: BLE001 - library errors become a counted rejection
        raise ImageError('convert', f'cannot convert {msg.encoding}: {exc}') from exc
    return _as_rgb(image)


def compressed_size(data: bytes):
    """(width, height) read from a compressed image's header, nothing decoded (Pillow opens
    lazily: PNG, JPEG, WebP, BMP, TIFF, GIF and the other formats it identifies).

    :raises ImageError: 'decode' when no format's header can be read.
    """
    import io

    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageError('decode', f'cannot read the image header: {exc}') from None
    except Image.DecompressionBombError as exc:  # (Pillow's own limit, far above ours)
        raise ImageError('too_large', f'larger than {MAX_SIDE_PX} px a side (read from the '
                         f'header; not decoded): {exc}') from None


def compressed_to_rgb(msg) -> np.ndarray:
    """``sensor_msgs/CompressedImage`` (JPEG/PNG) -> uint8 (H, W, 3) RGB.

    The payload size and the width and height in the header are checked before anything is
    decoded (a 2.7 MB PNG can decode to 30000 x 30000 pixels, 2.5 GB).

    :raises ImageError: empty, too large (payload over :data:`MAX_COMPRESSED_BYTES`, a side
        over :data:`MAX_SIDE_PX`), an unreadable header, corrupted or truncated data.
    """
    import cv2

    raw = bytes(msg.data)
    if not raw:
        raise ImageError('empty', 'compressed image has no data')
    if len(raw) > MAX_COMPRESSED_BYTES:
        raise ImageError('too_large', f'compressed payload of {len(raw)} bytes exceeds '
                         f'{MAX_COMPRESSED_BYTES}')
    width, height = compressed_size(raw)
    if max(width, height) > MAX_SIDE_PX:
        raise ImageError('too_large', f'{width}x{height} exceeds {MAX_SIDE_PX} px (read '
                         'from the header; not decoded)')
    data = np.frombuffer(raw, dtype=np.uint8)
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if bgr is None:
        raise ImageError('decode', f'cannot decode {msg.format or "compressed"} data')
    if max(bgr.shape[:2]) > MAX_SIDE_PX:
        raise ImageError('too_large', f'{bgr.shape[1]}x{bgr.shape[0]} exceeds {MAX_SIDE_PX} px')
    return np.ascontiguousarray(bgr[:, :, ::-1])


def _as_rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.dtype != np.uint8:
        image = (image / 256).astype(np.uint8) if image.dtype == np.uint16 else \
            np.clip(image, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image[:, :, :3])


def stamp_to_sec(stamp) -> float:
    """``builtin_interfaces/Time`` -> float seconds (NaN when ``stamp`` is None)."""
    if stamp is None:
        return math.nan
    return stamp.sec + stamp.nanosec * 1e-9


def header_of(source: ev.FrameRef):
    """``std_msgs/Header`` with the stamp and frame_id of ``source`` (zero stamp if none)."""
    from std_msgs.msg import Header
    header = Header(frame_id=source.frame_id)
    if source.stamp is not None:
        header.stamp = source.stamp
    return header


def _header(msg, source: ev.FrameRef):
    if source.stamp is not None:
        msg.header.stamp = source.stamp
    msg.header.frame_id = source.frame_id
    return msg


def token_msg(event: ev.TokenEvent):
    from mossv_ros.msg import Token
    msg = Token(round_id=event.round_id, request_id=event.request_id,
                revision=event.revision, token_index=event.token_index,
                token_id=event.token_id, text=event.text, camera=event.camera)
    return _header(msg, event.source)


def silence_msg(event: ev.SilenceEvent):
    from mossv_ros.msg import Silence
    msg = Silence(round_id=event.round_id,
                  state=Silence.STATE_SILENT if event.is_silent else Silence.STATE_SPEAKING,
                  frame_index=max(event.frame_index, 0),
                  previous_duration_sec=float(event.previous_duration_sec),
                  camera=event.camera)
    return _header(msg, event.source)


def answer_msg(event: ev.AnswerEvent):
    from mossv_ros.msg import Answer
    msg = Answer(round_id=event.round_id, request_id=event.request_id, revision=event.revision,
                 question=event.question, text=event.text, is_final=event.is_final,
                 end_reason=event.end_reason,
                 first_frame_index=event.first_frame_index,
                 last_frame_index=event.last_frame_index, camera=event.camera)
    return _header(msg, event.source)


def rejected_answer_msg(request_id: str, question: str, reason: str, camera: str = ''):
    """The final Answer of a Question that was never accepted (``end_reason`` 'rejected:
    <why>', round 0). What it quotes of the input is bounded, whatever the input's size: the
    ``request_id`` is cut to its first ``MAX_REQUEST_ID_CHARS`` characters (the sender can
    still match it, and the reason says it was cut), the question and camera are quoted as
    :func:`~mossv_ros.engine.policy.echo` does."""
    from mossv_ros.msg import Answer

    from ..engine.policy import echo, MAX_REQUEST_ID_CHARS
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        reason += (f' (request_id echoed cut to its first {MAX_REQUEST_ID_CHARS} of '
                   f'{len(request_id)} characters)')
    return Answer(request_id=request_id[:MAX_REQUEST_ID_CHARS], question=echo(question),
                  is_final=True, end_reason=f'rejected: {reason}', camera=echo(camera, 64))


def cancelled_answer_msg(event: ev.RoundEvent):
    """The final Answer of a round cancelled before it was answered (queue full, reset,
    deactivate, shutdown): ``end_reason`` 'cancelled: <why>'."""
    from mossv_ros.msg import Answer
    return Answer(round_id=event.round_id, request_id=event.request_id,
                  question=event.question, is_final=True,
                  end_reason=f'cancelled: {event.reason}', camera=event.camera)


def event_msg(event):
    """(publisher key, message) of an engine event that is published as a message ('tokens',
    'silence', 'answer'), or None for events the node handles otherwise (errors, resets,
    frames, round starts)."""
    if isinstance(event, ev.TokenEvent):
        return 'tokens', token_msg(event)
    if isinstance(event, ev.SilenceEvent):
        return 'silence', silence_msg(event)
    if isinstance(event, ev.AnswerEvent):
        return 'answer', answer_msg(event)
    if isinstance(event, ev.RoundEvent) and event.kind == 'cancelled':
        return 'answer', cancelled_answer_msg(event)
    return None


STATUS_STATES = {'unloaded': 0, 'loading': 1, 'ready': 2, 'error': 3, 'inactive': 4}


def camera_status_msg(cam: ev.CameraStats, frame_gap_sec: float = math.nan):
    """One camera's entry of ``Status.cameras``."""
    from mossv_ros.msg import CameraStatus
    m = cam.last_metrics or ev.RoundMetrics()
    msg = CameraStatus(name=cam.name, current_round_id=cam.current_round_id,
                       num_frames_received=cam.num_frames_received,
                       num_frames_cached=cam.num_frames_cached,
                       num_dropped_frames=cam.num_dropped_frames, cache_bytes=cam.cache_bytes,
                       num_context_tokens=cam.num_context_tokens,
                       num_session_resets=cam.num_session_resets,
                       frame_gap_sec=float(frame_gap_sec), frame_lag_sec=float(m.frame_lag_sec),
                       ttft_sec=float(m.ttft_sec))
    return _header(msg, cam.newest_frame)


def status_msg(stats: ev.EngineStats, num_invalid_frames: int,
               frame_gap_sec: float = math.nan, warning: str = '', camera_gaps=None,
               lifecycle_state: str = ''):
    """``Status`` from the engine's counters; ``camera_gaps``: {camera: frame_gap_sec}."""
    from mossv_ros.msg import Status
    m = stats.last_metrics or ev.RoundMetrics()
    gaps = camera_gaps or {}
    msg = Status(state=STATUS_STATES.get(stats.state, 3), state_text=str(stats.state),
                 lifecycle_state=lifecycle_state,
                 model_name=stats.model_name, current_round_id=stats.current_round_id,
                 num_frames_received=stats.num_frames_received,
                 num_frames_cached=stats.num_frames_cached,
                 num_frames_evicted=stats.num_frames_evicted,
                 num_dropped_frames=stats.num_dropped_frames,
                 num_invalid_frames=num_invalid_frames, cache_bytes=stats.cache_bytes,
                 num_context_tokens=stats.num_context_tokens, ttft_sec=float(m.ttft_sec),
                 itl_sec=float(m.itl_sec), frame_lag_sec=float(m.frame_lag_sec),
                 frame_gap_sec=float(frame_gap_sec),
                 longest_frame_gap_sec=float(stats.longest_frame_gap_sec),
                 num_session_resets=stats.num_session_resets,
                 num_oom_events=stats.num_oom_events,
                 num_stamp_outliers=stats.num_stamp_outliers, last_error=stats.last_error,
                 decode_path=stats.decode_path, quantization=stats.quantization,
                 weight_bytes=stats.weight_bytes,
                 planned_memory_bytes=stats.planned_memory_bytes,
                 measured_memory_bytes=stats.measured_memory_bytes,
                 available_memory_bytes=stats.available_memory_bytes, warning=warning,
                 cameras=[camera_status_msg(c, gaps.get(c.name, math.nan))
                          for c in stats.cameras])
    return _header(msg, stats.newest_frame)
