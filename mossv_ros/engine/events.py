"""Inputs to and events out of the streaming engine.

Pure module (no torch, no rclpy). ``stamp`` is the camera/sim time of a frame, an opaque value
copied untouched from input to output (the ROS layer uses ``builtin_interfaces/Time``);
``*_ts`` values are ``time.monotonic()`` seconds inside the engine. They are never mixed.
"""
from dataclasses import dataclass, field
import enum
from typing import Any, List, Optional, Tuple

# Why an utterance or round ended (Answer.end_reason).
END_SILENCE = 'silence'
END_INTERRUPTED = 'interrupted'
END_MAX_TOKENS = 'max_new_tokens'
END_CANCELLED = 'cancelled'
END_RESET = 'reset'
END_ERROR = 'error'
END_SHUTDOWN = 'shutdown'


class EngineState(enum.StrEnum):
    """Engine lifecycle (``Status.state_text``): a StrEnum, so it compares equal to its name."""

    UNLOADED = 'unloaded'
    LOADING = 'loading'  # the model loads or the session prefill runs
    READY = 'ready'
    ERROR = 'error'  # the engine thread stopped; ``reset()`` restarts it


@dataclass
class Frame:
    """One camera frame for the engine.

    :ivar image: uint8 array of shape (height, width, 3), RGB channel order.
    :ivar stamp: the input header stamp, copied to every output it conditions.
    :ivar frame_id: the camera's TF frame.
    :ivar arrival_ts: ``time.monotonic()`` when the frame was received, seconds.
    :ivar epoch: set by the engine's inbox: the camera session the frame belongs to (a
        higher one than the session's starts a new session before it).
    """

    image: Any
    stamp: Any = None
    frame_id: str = ''
    arrival_ts: float = 0.0
    epoch: int = 0
    camera: str = ''  # set by the engine: the camera (session) it belongs to


@dataclass
class Question:
    """A user question; ``round_id`` is assigned by :meth:`StreamingEngine.submit_question`."""

    text: str
    request_id: str = ''
    round_id: int = 0
    submit_ts: float = 0.0
    token_ids: Tuple[int, ...] = ()  # the user turn, tokenized once at submit
    camera: str = ''  # the camera (session) asked; resolved at submit


@dataclass
class FrameRef:
    """Where an output came from: the newest frame that conditioned it."""

    frame_index: int = -1
    stamp: Any = None
    frame_id: str = ''
    arrival_ts: float = 0.0


@dataclass(kw_only=True)
class TokenEvent:
    """One streamed token (maps to ``mossv_ros/Token``)."""

    round_id: int
    request_id: str
    revision: int  # the utterance of the round it belongs to (AnswerEvent.revision)
    token_index: int
    token_id: int
    text: str
    source: FrameRef = field(default_factory=FrameRef)
    emit_ts: float = 0.0
    camera: str = ''  # the camera (session) it belongs to


@dataclass(kw_only=True)
class SilenceEvent:
    """The model went silent (``is_silent``) or resumed speaking (maps to ``mossv_ros/Silence``).

    :ivar previous_duration_sec: how long the previous state lasted, engine seconds.
    """

    round_id: int
    is_silent: bool
    frame_index: int
    previous_duration_sec: float
    source: FrameRef = field(default_factory=FrameRef)
    camera: str = ''  # the camera (session) it belongs to


@dataclass(kw_only=True)
class AnswerEvent:
    """A complete utterance of a round: revision 0 is the answer, 1.. later revisions."""

    round_id: int
    request_id: str
    revision: int
    question: str
    text: str
    is_final: bool
    end_reason: str
    first_frame_index: int
    last_frame_index: int
    source: FrameRef = field(default_factory=FrameRef)
    camera: str = ''  # the camera (session) it belongs to


@dataclass(kw_only=True)
class RoundEvent:
    """A round (question) started, ended or was cancelled.

    :ivar kind: 'started', 'ended' or 'cancelled'.
    :ivar reason: one of the ``END_*`` strings for 'ended'/'cancelled'.
    """

    round_id: int
    request_id: str
    kind: str
    reason: str = ''
    question: str = ''
    camera: str = ''  # the camera (session) it belongs to


@dataclass
class FrameEvent:
    """A frame went into the vision cache and conditions the tokens from now on.

    :ivar image: the RGB uint8 (H, W, 3) image as received (before letterboxing; shared,
        never modified); ``source`` says its frame index, stamp and frame_id.
    """

    image: Any
    source: FrameRef
    camera: str = ''


@dataclass
class SessionResetEvent:
    """The session was cleared (vision cache and dialogue); ``reason`` says why."""

    reason: str
    camera: str = ''


@dataclass
class ErrorEvent:
    """An error inside the engine. ``fatal``: the engine thread stopped (state ERROR)."""

    message: str
    fatal: bool = False
    round_id: int = 0
    camera: str = ''  # '' when not about one camera


@dataclass
class RoundMetrics:
    """Per-round serving metrics, from monotonic clocks, no device sync on the hot path.

    :ivar ttft_sec: question accepted -> first answer token emitted, seconds.
    :ivar itl_sec: mean inter-token latency of the round so far, seconds.
    :ivar frame_lag_sec: emit time - arrival time of the newest frame used, seconds.
    """

    round_id: int = 0
    ttft_sec: float = float('nan')
    itl_sec: float = float('nan')
    frame_lag_sec: float = float('nan')
    num_tokens: int = 0
    end_ts: float = 0.0  # monotonic time the round ended


@dataclass
class CameraStats:
    """Counters of one camera's session (Status.cameras)."""

    name: str = ''
    current_round_id: int = 0
    num_frames_received: int = 0
    num_frames_cached: int = 0
    num_dropped_frames: int = 0
    cache_bytes: int = 0
    num_context_tokens: int = 0
    num_session_resets: int = 0
    last_stamp_sec: Optional[float] = None  # newest stamp admitted (None before any)
    last_metrics: Optional[RoundMetrics] = None
    newest_frame: FrameRef = field(default_factory=FrameRef)


@dataclass
class EngineStats:
    """Snapshot of engine counters for Status (all counts since engine start)."""

    state: str = EngineState.UNLOADED
    model_name: str = 'none'
    current_round_id: int = 0
    num_frames_received: int = 0
    num_frames_cached: int = 0
    num_frames_evicted: int = 0
    num_dropped_frames: int = 0
    num_frames_encoded: int = 0
    cache_bytes: int = 0
    num_context_tokens: int = 0
    num_rounds_started: int = 0
    num_rounds_answered: int = 0
    num_rounds_cancelled: int = 0
    num_rounds_failed: int = 0
    num_session_resets: int = 0
    num_oom_events: int = 0
    longest_frame_gap_sec: float = 0.0
    num_stamp_outliers: int = 0
    last_error: str = ''
    #: how the text step runs (``ModelRunner.capture_graphs``): 'cuda graphs (...)' or
    #: 'eager (<why>)'; '' before the model loads
    decode_path: str = ''
    #: ``model.quantization`` in use ('' before the model loads) and the weights' bytes as
    #: stored (quantized layers at their quantized size)
    quantization: str = ''
    weight_bytes: int = 0
    #: the memory plan (:mod:`.memory`): bytes planned for weights, caches, activations and
    #: workspace; bytes measured (CUDA: the allocator's peak; CPU: weights + caches); bytes
    #: the node may use (0: unknown); all 0 before the model loads
    planned_memory_bytes: int = 0
    measured_memory_bytes: int = 0
    available_memory_bytes: int = 0
    last_metrics: Optional[RoundMetrics] = None
    #: the newest frame in the vision cache (index, stamp, frame_id) of the default camera
    newest_frame: FrameRef = field(default_factory=FrameRef)
    #: per camera, in ``EngineConfig.cameras`` order
    cameras: List[CameraStats] = field(default_factory=list)
