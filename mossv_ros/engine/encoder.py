"""The encoder thread: incoming frames into cross-attention K/V as soon as they arrive.

It takes raw frames from the engine's inbox, encodes them with the runner (on CUDA on the
runner's encoder stream, returning once the encode has finished: docs/model.md section 10.4)
and hands each encoded frame back to the inbox, where the engine thread takes it at its next
token boundary. Perception never waits for generation, and decoding never waits for an encode.
"""
from .events import ErrorEvent, Frame


def run_encoder(parts) -> None:
    """The thread's loop, until the engine's inbox closes.

    :param parts: the engine's :class:`~.camera.EngineParts` (its inbox, runner, sessions,
        configuration and event output).
    """
    inbox = parts.inbox
    while True:
        taken = inbox.take_frames_to_encode(lambda: bool(parts.sessions),
                                            max_frames=len(parts.config.cameras))
        if taken is None:
            return
        if len(taken) == 1:
            encoded = [_encode_one(parts, *taken[0])]
        else:
            try:  # frames that arrived together: one batch through the vision tower
                encoded = parts.runner.encode_frames([frame.image for frame, _ in taken])
            except Exception:  # noqa: BLE001 - a bad frame in the batch: each alone
                encoded = [_encode_one(parts, frame, index) for frame, index in taken]
        for (frame, index), enc in zip(taken, encoded):
            if enc is not None:
                enc.frame_index = index
            inbox.put_encoded(frame, enc)


def _encode_one(parts, frame: Frame, index: int):
    """Encode one frame; a bad frame is reported (an ErrorEvent) and gives None."""
    try:
        return parts.runner.encode_frames([frame.image])[0]
    except Exception as exc:  # noqa: BLE001 - bad frame: count, report, keep going
        parts.emit(ErrorEvent(f'frame {index} could not be encoded: {exc}',
                               camera=frame.camera))
        return None
