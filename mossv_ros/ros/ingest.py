"""Camera topics in: the subscriptions, per-topic image counters, stamps, conversion, and the
explanation when no frame arrives.

The image callback only converts and hands over: the engine's inbox admits frames
(:meth:`~mossv_ros.engine.engine.StreamingEngine.admit`, before any conversion, so subsampled
frames cost nothing). While a camera topic is quiet, a check of the ROS graph every
:data:`GRAPH_CHECK_SEC` names why (a publisher of another type under the topic, frames on the
other transport, raw frames over best effort) as soon as such a publisher appears, and the
warning goes as soon as its cause does.
"""
from dataclasses import dataclass
import functools
import time
from typing import Dict, List, Optional, Tuple

from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.qos import qos_profile_sensor_data, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image

from ..engine import events as ev
from . import convert

#: seconds without an image on a camera topic before the node says why (log, Status)
NO_FRAME_WARNING_SEC = 5.0
#: how often the ROS graph is read while a camera topic is quiet, seconds
GRAPH_CHECK_SEC = 2.0


@dataclass
class TopicCounts:
    """Images of one camera topic (every message, before admission)."""

    images: int = 0  # image messages received
    invalid: int = 0  # of them malformed or unsupported: counted and skipped
    last_image_ts: Optional[float] = None  # time.monotonic() of the newest one


class CameraIngest:
    """The node's camera subscriptions (created on activate, destroyed on deactivate) and
    what comes in on them.

    :param node: the :class:`~.node.AssistantNode` (its engine, parameters, clock, logger).
    :param warnings: the node's :class:`~.status.Warnings`.
    """

    def __init__(self, node, warnings, callback_group) -> None:
        self._node = node
        self._warnings = warnings
        self._callback_group = callback_group
        self._subs: List[Tuple[object, str, str]] = []  # (subscription, topic, camera)
        self._counts: Dict[str, TopicCounts] = {}
        self._since = time.monotonic()
        self.num_invalid = 0

    # ------------------------------------------------------------------ subscriptions
    def open(self) -> List[str]:
        """Subscribe every camera topic of the parameters (QoS ``qos.image_reliability``,
        transport ``topics.transport``). :returns: the resolved topic names."""
        node = self._node
        reliable = node.param('qos.image_reliability') == 'reliable'
        qos = QoSProfile(depth=1, history=qos_profile_sensor_data.history,
                         durability=qos_profile_sensor_data.durability,
                         reliability=(ReliabilityPolicy.RELIABLE if reliable
                                      else ReliabilityPolicy.BEST_EFFORT))
        for msg_type, topic, camera in self._wanted():
            topic = node.resolve_topic_name(topic)  # one name per camera: logs, counts, stamps
            to_rgb = (convert.compressed_to_rgb if msg_type is CompressedImage
                      else convert.image_to_rgb)
            events = SubscriptionEventCallbacks(incompatible_qos=functools.partial(
                self._on_incompatible_qos, topic=topic))
            sub = node.create_subscription(
                msg_type, topic, functools.partial(self.on_image, to_rgb=to_rgb, topic=topic,
                                                   camera=camera),
                qos, callback_group=self._callback_group, event_callbacks=events)
            self._subs.append((sub, topic, camera))
        self._since = time.monotonic()
        return [topic for _, topic, _ in self._subs]

    def _wanted(self) -> List[Tuple[type, str, str]]:
        """(message type, topic, camera) of every subscription the parameters ask for."""
        node = self._node
        compressed = node.param('topics.transport') == 'compressed'
        names, topics = node.camera_config()
        if names:  # a session per camera: one image topic each
            pairs = list(zip(topics, names))
        else:  # the single-camera configuration: every topic feeds the default camera
            pairs = [(t, '') for t in node.param('topics.images') if t]
        wanted = [(CompressedImage, f'{t}/compressed', cam) if compressed else (Image, t, cam)
                  for t, cam in pairs]
        return wanted + [(CompressedImage, t, '') for t in node.param('topics.compressed_images')
                         if t and not names]

    def close(self) -> None:
        for sub, _, _ in self._subs:
            self._node.destroy_subscription(sub)
        self._subs = []
        self._warnings.clear('graph:')
        self._warnings.clear('no_frames')

    def topics(self) -> List[Tuple[str, str]]:
        """(topic, camera) of every subscription (camera '' = the default one)."""
        return [(topic, camera) for _, topic, camera in self._subs]

    def counts(self, topic: str) -> TopicCounts:
        return self._counts.get(topic, TopicCounts())

    # ------------------------------------------------------------------ images
    def on_image(self, msg, to_rgb, topic: str, camera: str = '') -> None:
        """An image on a camera topic: count, time, admit, convert, hand to the engine."""
        counts = self._counts.setdefault(topic, TopicCounts())
        counts.images += 1
        counts.last_image_ts = time.monotonic()
        self._warnings.clear(f'graph:{topic}')
        self._warnings.clear('no_frames')
        engine = self._node.engine
        if engine is None:
            return
        stamp, stamp_sec = self._stamp(msg, topic)
        if stamp is None:
            return
        verdict = engine.admit(stamp_sec, topic, camera)
        if verdict == 'skip':
            return  # subsampled to frames.rate_hz (or an odd stamp) before any conversion
        try:
            rgb = to_rgb(msg)
        except convert.ImageError as exc:
            self._invalid(topic, counts, exc)
            return
        engine.submit_frame(ev.Frame(rgb, stamp, msg.header.frame_id), stamp_sec=stamp_sec,
                            admitted=verdict, camera=camera, topic=topic)

    def _stamp(self, msg, topic: str):
        """(stamp, seconds) of an image; a zero stamp (a driver without stamps) is replaced by
        the node clock, on the outputs too; (None, None) when the clock is zero as well."""
        stamp = msg.header.stamp
        stamp_sec = convert.stamp_to_sec(stamp)
        if stamp_sec != 0.0:
            self._warnings.clear(f'zero_stamp:{topic}')
            return stamp, stamp_sec
        now = self._node.get_clock().now()
        if now.nanoseconds == 0:
            self._warnings.set(f'zero_stamp:{topic}', (
                f'images on {topic} have zero stamps and the node clock is zero (use_sim_time '
                'without /clock?): they cannot be timed and are skipped; publish /clock '
                '(mossv-ros bag play --clock)'))
            return None, None
        self._warnings.set(f'zero_stamp:{topic}', f'images on {topic} have zero stamps: the '
                           'node clock stamps them and their outputs')
        return now.to_msg(), now.nanoseconds * 1e-9

    def _on_incompatible_qos(self, event, topic: str) -> None:
        """A camera publisher this subscription can never match (rclpy QoS event)."""
        self._warnings.set(f'graph:{topic}:qos', (
            f'a publisher on {topic} has a QoS incompatible with this node (policy '
            f'{event.last_policy_kind.name}, {event.total_count} so far): no frame from it '
            'arrives; with a best-effort camera set qos.image_reliability:=best_effort'))

    # ------------------------------------------------------------------ the graph
    def _invalid(self, topic: str, counts: 'TopicCounts', exc) -> None:
        """A malformed image: counted and skipped, with a warning that names the cause."""
        self.num_invalid += 1
        counts.invalid += 1
        self._warnings.set(f'invalid:{topic}:{exc.kind}', (
            f'skipped image on {topic} ({exc.kind}): {exc} [{counts.invalid} invalid so far]'),
            recurring=True)

    def _quiet(self, topic: str, now: float) -> bool:
        """No image on ``topic`` for :data:`NO_FRAME_WARNING_SEC`, nor since activation."""
        counts = self._counts.get(topic)
        last = counts.last_image_ts if counts else None
        return ((last is None or now - last >= NO_FRAME_WARNING_SEC)
                and now - self._since >= NO_FRAME_WARNING_SEC)

    def _silent_since_start(self, topic: str) -> bool:
        counts = self._counts.get(topic)
        return counts is None or counts.last_image_ts is None \
            or counts.last_image_ts < self._since

    def check_graph(self) -> None:
        """For every quiet camera topic (no image for :data:`NO_FRAME_WARNING_SEC`), say why
        when the graph shows it; a topic that never had an image since activation and shows
        no reason gets the generic question. Causes that are gone are cleared."""
        now = time.monotonic()
        published = dict(self._node.get_topic_names_and_types())
        silent_since_start = []
        for sub, topic, _ in self._subs:
            quiet = self._quiet(topic, now)
            hints = self._hints(topic, sub.msg_type.__name__, published) if quiet else []
            if hints:
                self._warnings.set(f'graph:{topic}', f'no image on {topic}: '
                                   + '; '.join(hints))
            else:
                self._warnings.clear(f'graph:{topic}')
                if quiet and self._silent_since_start(topic):
                    silent_since_start.append(topic)
        if silent_since_start:
            self._warnings.set('no_frames', (
                f'no image in {NO_FRAME_WARNING_SEC:.0f} s since activation on '
                f'{", ".join(silent_since_start)} (is the camera publishing?)'))
        else:
            self._warnings.clear('no_frames')

    def _hints(self, topic: str, ours: str, published: dict) -> List[str]:
        """Why no frame comes on ``topic`` (subscribed as ``ours``), as the graph shows it."""
        hints = []
        other = [t for t in published.get(topic, []) if not t.endswith('/' + ours)]
        if other:
            fix = (' (set topics.transport:=compressed)' if other[0].endswith('CompressedImage')
                   else '')
            hints.append(f'{topic} is published as {other[0]}, the node expects {ours}{fix}')
        if ours == 'Image' and 'sensor_msgs/msg/CompressedImage' in published.get(
                topic + '/compressed', []):
            hints.append(f'frames are published on {topic}/compressed: set '
                         'topics.transport:=compressed')
        base = topic[:-len('/compressed')] if topic.endswith('/compressed') else ''
        if ours == 'CompressedImage' and base and 'sensor_msgs/msg/Image' in published.get(
                base, []):
            hints.append(f'raw frames are published on {base}: set topics.transport:=raw')
        if (ours == 'Image' and not other and self._node.count_publishers(topic)
                and self._node.param('qos.image_reliability') == 'best_effort'):
            hints.append(f'{topic} has a publisher but nothing arrives: raw images between '
                         'processes over best effort are mostly lost by the transport '
                         '(README, QoS): use qos.image_reliability:=reliable with a reliable '
                         'camera, or compressed images')
        return hints
