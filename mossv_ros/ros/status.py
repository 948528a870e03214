"""What the node says about itself: warnings by cause, ``~/status`` and ``/diagnostics``.

One place assembles both reports from the same figures (:meth:`StatusReporter.snapshot`):
the engine's counters (totals and per camera), the camera ingest's image counters, the
lifecycle state and the warnings, so Status and /diagnostics never disagree.
"""
import math
import time
from typing import Callable, Dict, Optional

from ..engine import events as ev
from . import convert
from .diagnostics import diagnostic_array

#: seconds a warning stays in Status.warning after its cause was last seen
WARNING_HOLD_SEC = 30.0
#: a warning of a recurring cause (invalid images, callback failures) is logged again after
#: this many seconds while the cause goes on
RELOG_SEC = 10.0


class Warnings:
    """The node's warnings, by cause: logged when a cause appears (recurring causes again
    every :data:`RELOG_SEC`), shown in ``Status.warning`` while the cause lasts, and gone as
    soon as its cause is (:meth:`clear`), or :data:`WARNING_HOLD_SEC` after it was last seen.

    :param log: ``log(text)``, the node's warning logger.
    """

    def __init__(self, log: Callable[[str], None], clock=time.monotonic) -> None:
        self._log = log
        self._clock = clock
        self._active: Dict[str, tuple] = {}  # cause -> (text, last seen, last logged)

    def set(self, cause: str, text: str, recurring: bool = False) -> None:
        """``cause`` is present (now) and ``text`` says what to do about it."""
        now = self._clock()
        old = self._active.get(cause)
        fresh = old is None or now - old[1] >= WARNING_HOLD_SEC
        due = fresh or (now - old[2] > RELOG_SEC if recurring else old[0] != text)
        if due:
            self._log(text)
        self._active[cause] = (text, now, now if due else old[2])

    def clear(self, prefix: str) -> None:
        """Every cause that starts with ``prefix`` is gone."""
        for cause in [c for c in self._active if c.startswith(prefix)]:
            del self._active[cause]

    def active(self) -> Dict[str, str]:
        """{cause: text} of the warnings that hold now."""
        now = self._clock()
        return {cause: text for cause, (text, seen, _) in self._active.items()
                if now - seen < WARNING_HOLD_SEC}

    def current(self) -> str:
        """The warning seen last among those that hold ('' when none)."""
        now = self._clock()
        live = [(seen, text) for text, seen, _ in self._active.values()
                if now - seen < WARNING_HOLD_SEC]
        return max(live)[1] if live else ''


class StatusReporter:
    """Builds and publishes ``~/status`` and ``/diagnostics`` (on the node's timers).

    :param node: the :class:`~.node.AssistantNode` (its engine, clock, parameters, state).
    :param ingest: the node's :class:`~.ingest.CameraIngest` (image counters per topic).
    :param warnings: the node's :class:`Warnings`.
    """

    def __init__(self, node, ingest, warnings: Warnings, status_pub, diagnostics_pub) -> None:
        self._node = node
        self._ingest = ingest
        self._warnings = warnings
        self._status_pub = status_pub
        self._diagnostics_pub = diagnostics_pub

    def snapshot(self) -> ev.EngineStats:
        """The engine's counters as Status reports them: 'loading' while the model loads,
        'unloaded' without an engine, and 'inactive' when the engine is ready but the node
        is not active (lifecycle), so it rejects questions."""
        node = self._node
        engine = node.engine
        if node.loading:
            return ev.EngineStats(state='loading', model_name=node.model_name())
        if engine is None:
            return ev.EngineStats(state='unloaded', last_error=node.configure_error)
        stats = engine.stats()
        if stats.state == 'ready' and not node.active:
            stats.state = 'inactive'
        return stats

    def _gap(self, last: Optional[float], now_ns: int) -> float:
        """Node clock minus a stamp, seconds: NaN before any image or while the (sim) clock
        has not started; never negative."""
        return math.nan if last is None or now_ns == 0 else max(0.0, now_ns * 1e-9 - last)

    def publish_status(self) -> None:
        node = self._node
        stats = self.snapshot()
        engine = node.engine
        now_ns = node.get_clock().now().nanoseconds
        last = engine.last_stamp_sec() if engine else None
        gaps = {c.name: self._gap(c.last_stamp_sec, now_ns) for c in stats.cameras}
        self._status_pub.publish(convert.status_msg(
            stats, self._ingest.num_invalid, self._gap(last, now_ns),
            self._warnings.current(), gaps, node.lifecycle_state()))

    def publish_diagnostics(self) -> None:
        node = self._node
        stats = self.snapshot()
        engine = node.engine
        model = {'path': str(node.param('model.path'))}
        if engine is not None and engine.runner is not None:
            cfg = engine.runner.config
            model.update(device=cfg.device, dtype=cfg.dtype,
                         attention=engine.runner.attn_implementation)
            plan = engine.runner.memory_plan
            if plan is not None:
                model['memory_plan'] = '; '.join(f'{what}: {n} bytes ({how})'
                                                 for what, n, how in plan.rows())
        stamps = engine.topic_stamps() if engine else {}
        per_camera = {c.name: c for c in stats.cameras}
        cameras = []
        for topic, camera in self._ingest.topics():
            counts = self._ingest.counts(topic)
            cam = per_camera.get(camera or (engine.config.cameras[0] if engine else ''))
            cameras.append({'topic': topic, 'last_stamp_sec': stamps.get(topic),
                            'images': counts.images, 'invalid': counts.invalid,
                            'camera': cam})
        now = node.get_clock().now()
        self._diagnostics_pub.publish(diagnostic_array(
            node.get_name(), now.to_msg(), model, stats, cameras,
            node.param('diagnostics.camera_stale_sec'),
            now.nanoseconds * 1e-9 if now.nanoseconds else None, node.lifecycle_state()))
