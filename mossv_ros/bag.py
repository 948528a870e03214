"""rosbag2 tools without the ``ros2`` CLI: write a bag from a video, play a bag into ROS.

Bags are written with the ``rosbags`` library (rosbag2 format version 8, sqlite3 or mcap
storage; message definitions and RIHS01 type hashes included), so a real ``ros2 bag play`` on
Iron/Jazzy/Kilted reads them. Playback publishes each message's raw CDR bytes with an rclpy
publisher of the recorded type at the recorded timing (scaled by ``rate``), like
``ros2 bag play``, optionally with ``/clock``.
"""
from dataclasses import dataclass
import importlib
import math
from pathlib import Path
import shutil
import threading
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

DEFAULT_IMAGE_TOPIC = '/image'
DEFAULT_QUESTION_TOPIC = '/mossv_assistant/question'
QUESTION_TYPE = 'mossv_ros/msg/Question'
BAG_VERSION = 8  # readable by rosbag2 in Iron, Jazzy and Kilted


@dataclass
class BagSummary:
    """What :func:`from_video` wrote: counts per topic and the bag's time range (ns)."""

    path: Path
    counts: Dict[str, int]
    start_ns: int
    end_ns: int


def parse_question(spec: str) -> Tuple[float, str]:
    """``'SEC:TEXT'`` -> (seconds, text).

    :raises ValueError: no colon, a non-numeric or negative time, or empty text.
    """
    sec, sep, text = spec.partition(':')
    try:
        t = float(sec)
    except ValueError:
        t = -1.0
    if not sep or not math.isfinite(t) or t < 0 or not text.strip():
        raise ValueError(f'question {spec!r} is not SEC:TEXT (e.g. 4.5:What is on the table?)')
    return t, text


def _question_msgdef() -> str:
    """Text of msg/Question.msg from the installed package share, else from the checkout."""
    candidates = []
    try:
        from ament_index_python.packages import get_package_share_directory
        candidates.append(Path(get_package_share_directory('mossv_ros')) / 'msg')
    except Exception:  # noqa: BLE001 - not installed with ament: use the source tree
        pass
    candidates.append(Path(__file__).resolve().parents[1] / 'msg')
    for folder in candidates:
        if (folder / 'Question.msg').is_file():
            return (folder / 'Question.msg').read_text()
    raise FileNotFoundError('mossv_ros msg/Question.msg not found')


def typestore():
    """A Kilted typestore with ``mossv_ros/msg/Question`` registered."""
    from rosbags.typesys import get_types_from_msg, get_typestore, Stores

    store = get_typestore(Stores.ROS2_KILTED)
    store.register(get_types_from_msg(_question_msgdef(), QUESTION_TYPE))
    return store


def _video_frames(video: str, fps: Optional[float], width: Optional[int]):
    """Yield (t_sec, BGR frame) from a video file at its own timestamps."""
    import cv2

    cap = cv2.VideoCapture(str(video))
    if not cap.isOpened():
        raise ValueError(f'cannot open video {video}')
    source_fps = cap.get(cv2.CAP_PROP_FPS) or 30.0
    next_t, index = 0.0, 0
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            t = index / source_fps
            index += 1
            if fps and t + 1e-6 < next_t:
                continue
            next_t = t + 1.0 / fps if fps else t
            if width and frame.shape[1] != width:
                height = max(1, round(frame.shape[0] * width / frame.shape[1]))
                frame = cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA)
            yield t, frame
    finally:
        cap.release()


def from_video(video: str, out_bag: str, questions: Sequence[Tuple[float, str]] = (),
               storage: str = 'mcap', compressed: bool = False,
               image_topic: str = DEFAULT_IMAGE_TOPIC,
               question_topic: str = DEFAULT_QUESTION_TOPIC, frame_id: str = 'camera',
               fps: Optional[float] = None, width: Optional[int] = None,
               start_ns: Optional[int] = None,
               progress: Optional[Callable[[int], None]] = None) -> BagSummary:
    """Write a rosbag2 with ``video`` as camera images and ``questions`` as Question messages.

    :param questions: (seconds after the first frame, text) pairs, on ``question_topic``.
    :param storage: ``'sqlite3'`` or ``'mcap'``.
    :param compressed: write ``sensor_msgs/CompressedImage`` (JPEG) instead of ``bgr8`` Image.
    :param fps: keep at most this many frames per second (default: every frame).
    :param width: resize frames to this width (aspect kept).
    :param start_ns: stamp of the first frame, ns since the epoch (default: now).
    :returns: a :class:`BagSummary`.
    :raises ValueError: a missing, unreadable or empty video, an unknown storage, a bad
        ``fps`` or ``width``, or an ``out_bag`` that exists already (nothing is left behind
        on failure).
    """
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise ValueError(f'fps={fps!r} is invalid: expected a number > 0')
    if width is not None and not 8 <= width <= 8192:
        raise ValueError(f'width={width!r} is invalid: expected pixels in [8, 8192]')
    if not Path(video).is_file():
        raise ValueError(f'video {video} does not exist')
    if Path(out_bag).exists():
        raise ValueError(f'{out_bag} exists already: choose a new folder (rosbag2 never '
                         'overwrites)')
    try:
        summary = from_frames(_video_frames(video, fps, width), out_bag, questions, storage,
                              compressed, image_topic, question_topic, frame_id, start_ns,
                              progress)
        if summary.counts[image_topic] == 0:
            raise ValueError(f'video {video} has no frames')
    except BaseException:
        # a half-written bag (no metadata.yaml) would block the rerun: it was ours, remove it
        shutil.rmtree(out_bag, ignore_errors=True)
        raise
    return summary


def from_frames(frames: Iterable[Tuple[float, np.ndarray]], out_bag: str,
                questions: Sequence[Tuple[float, str]] = (), storage: str = 'mcap',
                compressed: bool = False, image_topic: str = DEFAULT_IMAGE_TOPIC,
                question_topic: str = DEFAULT_QUESTION_TOPIC, frame_id: str = 'camera',
                start_ns: Optional[int] = None,
                progress: Optional[Callable[[int], None]] = None) -> BagSummary:
    """Write a rosbag2 from (seconds, BGR uint8 (H, W, 3) frame) pairs and questions; the
    arguments are those of :func:`from_video`. Frame and question stamps (header and record
    time) are ``start_ns`` + their seconds.
    """
    import cv2
    from rosbags.rosbag2 import StoragePlugin, Writer

    plugins = {'sqlite3': StoragePlugin.SQLITE3, 'mcap': StoragePlugin.MCAP}
    if storage not in plugins:
        raise ValueError(f'storage must be sqlite3 or mcap, not {storage!r}')
    store = typestore()
    types = store.types  # rosbags message classes
    start_ns = time.time_ns() if start_ns is None else int(start_ns)
    pending = sorted(questions)
    counts = {image_topic: 0, question_topic: 0}
    written_ns = [start_ns]

    def header(ns, frame):
        time_msg = types['builtin_interfaces/msg/Time'](sec=ns // 1_000_000_000,
                                                         nanosec=ns % 1_000_000_000)
        return types['std_msgs/msg/Header'](stamp=time_msg, frame_id=frame)

    with Writer(out_bag, version=BAG_VERSION, storage_plugin=plugins[storage]) as writer:
        msgtype = 'sensor_msgs/msg/' + ('CompressedImage' if compressed else 'Image')
        images = writer.add_connection(image_topic, msgtype, typestore=store)
        asks = writer.add_connection(question_topic, QUESTION_TYPE, typestore=store)

        def write_questions(until_ns):
            while pending and start_ns + int(pending[0][0] * 1e9) <= until_ns:
                t, text = pending.pop(0)
                ns = start_ns + int(t * 1e9)
                msg = types[QUESTION_TYPE](header=header(ns, ''), text=text,
                                           request_id=f'bag-{counts[question_topic]}',
                                           camera='')
                writer.write(asks, ns, store.serialize_cdr(msg, QUESTION_TYPE))
                counts[question_topic] += 1
                written_ns.append(ns)

        for t, frame in frames:
            ns = start_ns + int(round(t * 1e9))
            write_questions(ns)
            if compressed:
                _, jpeg = cv2.imencode('.jpg', frame, [cv2.IMWRITE_JPEG_QUALITY, 90])
                msg = types[msgtype](header=header(ns, frame_id), format='jpeg',
                                     data=jpeg.reshape(-1))
            else:
                msg = types[msgtype](header=header(ns, frame_id), height=frame.shape[0],
                                     width=frame.shape[1], encoding='bgr8', is_bigendian=0,
                                     step=frame.shape[1] * 3,
                                     data=np.ascontiguousarray(frame).reshape(-1))
            writer.write(images, ns, store.serialize_cdr(msg, msgtype))
            counts[image_topic] += 1
            written_ns.append(ns)
            if progress is not None:
                progress(counts[image_topic])
        if pending:  # nothing would be streamed after them: refused, with the clip's end
            last = (max(written_ns) - start_ns) * 1e-9
            t, text = pending[0]
            raise ValueError(f"question at {t:g} s ({text!r}) comes after the clip's last "
                             f'frame at {last:.2f} s: no frame would follow it; ask it at '
                             f'or before {last:.2f} s')
    return BagSummary(Path(out_bag), counts, start_ns, max(written_ns))


# ---------------------------------------------------------------------------------- playback
def parse_remaps(remaps: Iterable[str]) -> Dict[str, str]:
    """``['from:=to', ...]`` -> {from: to}. :raises ValueError: an item without ``:=``."""
    out = {}
    for item in remaps:
        src, sep, dst = item.partition(':=')
        if not sep or not src or not dst:
            raise ValueError(f'remap {item!r} is not from:=to')
        out[src] = dst
    return out


def _msg_class(msgtype: str):
    """``'pkg/msg/Name'`` -> the generated rclpy message class."""
    package, _, name = msgtype.split('/')
    return getattr(importlib.import_module(f'{package}.msg'), name)


@dataclass
class PlayResult:
    """Messages published per topic (after remapping), the wall time the playback took, and
    the tag its questions' request ids carry (``bag-0@<tag>``; '' when not tagged)."""

    counts: Dict[str, int]
    wall_s: float
    request_tag: str = ''


#: the message type whose ``request_id`` a playback tags
QUESTION_MSGTYPE = 'mossv_ros/msg/Question'


def play(bag: str, rate: float = 1.0, clock: bool = False, clock_hz: float = 100.0,
         remap: Optional[Dict[str, str]] = None, topics: Optional[List[str]] = None,
         node=None, stop: Optional[threading.Event] = None, delay: float = 0.3,
         wait_for_subscribers: float = 0.0, request_tag: Optional[str] = None) -> PlayResult:
    """Publish a bag's messages at their recorded timing (like ``ros2 bag play``).

    Questions (``mossv_ros/msg/Question``) are published with ``@<tag>`` appended to their
    ``request_id``, one tag per playback, so each replay of a bag asks its questions under
    request ids of its own (the bag's ``bag-0`` becomes ``bag-0@<tag>``) and its final
    Answers are told apart from another replay's.

    :param rate: playback speed factor (2.0 = twice as fast).
    :param clock: publish ``rosgraph_msgs/Clock`` on ``/clock`` at ``clock_hz`` with bag time,
        for nodes running with ``use_sim_time``.
    :param remap: {recorded topic: published topic}.
    :param topics: only these recorded topics (default: all).
    :param node: an rclpy node to publish from (default: a new node in the default context;
        rclpy must be initialised).
    :param stop: set it to end playback early.
    :param delay: seconds between creating the publishers and the first message (discovery).
    :param wait_for_subscribers: wait up to this many seconds until every topic has a
        subscriber before starting (0: do not wait).
    :param request_tag: the tag (default: 8 random hex digits; '' leaves the ids as
        recorded).
    :raises ValueError: a non-positive rate or a message type that is not importable.
    """
    from rclpy.duration import Duration
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from rosbags.rosbag2 import Reader

    if rate <= 0:
        raise ValueError(f'rate must be > 0, not {rate}')
    if request_tag is None:
        import uuid
        request_tag = uuid.uuid4().hex[:8]
    remap = remap or {}
    own_node = node is None
    if own_node:
        import rclpy
        node = rclpy.create_node('mossv_bag_player')
    qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
    counts: Dict[str, int] = {}
    clock_pub = None
    if clock:
        from rosgraph_msgs.msg import Clock
        clock_pub = node.create_publisher(Clock, '/clock', 10)
    try:
        with Reader(bag) as reader:
            conns = [c for c in reader.connections if topics is None or c.topic in topics]
            pubs = {}
            for conn in conns:
                try:
                    cls = _msg_class(conn.msgtype)
                except (ImportError, AttributeError, ValueError) as exc:
                    raise ValueError(f'cannot play {conn.topic}: type {conn.msgtype} is not '
                                     f'importable ({exc})') from exc
                name = remap.get(conn.topic, conn.topic)
                tagged = cls if request_tag and conn.msgtype == QUESTION_MSGTYPE else None
                pubs[conn.id] = (node.create_publisher(cls, name, qos), name, tagged)
                counts.setdefault(name, 0)
            deadline = time.monotonic() + wait_for_subscribers
            while time.monotonic() < deadline and not all(
                    p.get_subscription_count() for p, _, _ in pubs.values()):
                time.sleep(0.05)
            time.sleep(delay)  # let subscribers match, as ros2 bag play's --delay does
            wall0 = time.monotonic()
            bag0 = None
            for conn, ns, raw in reader.messages(connections=conns):
                if bag0 is None:
                    bag0 = ns
                target = wall0 + (ns - bag0) * 1e-9 / rate
                while True:
                    now = time.monotonic()
                    if stop is not None and stop.is_set():
                        return PlayResult(counts, now - wall0, request_tag)
                    if clock_pub is not None:
                        _publish_clock(clock_pub, bag0 + int((now - wall0) * rate * 1e9))
                    if now >= target:
                        break
                    time.sleep(min(target - now, 1.0 / clock_hz if clock_pub else 0.05))
                if clock_pub is not None:
                    _publish_clock(clock_pub, ns)
                pub, name, tagged = pubs[conn.id]
                pub.publish(bytes(raw) if tagged is None else _tagged(raw, tagged, request_tag))
                counts[name] += 1
            for pub, _, _ in pubs.values():  # reliable: let the last messages reach subscribers
                pub.wait_for_all_acked(Duration(seconds=2))
            return PlayResult(counts, time.monotonic() - wall0, request_tag)
    finally:
        if own_node:
            node.destroy_node()


def _tagged(raw, cls, tag: str):
    """A recorded Question with ``@<tag>`` appended to its request_id."""
    from rclpy.serialization import deserialize_message
    msg = deserialize_message(bytes(raw), cls)
    msg.request_id = f'{msg.request_id}@{tag}'
    return msg


def _publish_clock(pub, ns: int) -> None:
    from builtin_interfaces.msg import Time
    from rosgraph_msgs.msg import Clock
    pub.publish(Clock(clock=Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)))
