"""``/diagnostics`` (``diagnostic_msgs/DiagnosticArray``, REP-107) for rqt_robot_monitor and
Foxglove: the model, the engine and each camera, with OK / WARN / ERROR levels.

The messages are built here directly (the Python ``diagnostic_updater`` is not on PyPI; a
distro's aggregator reads these the same way). Status names follow diagnostic_updater's
``<node name>: <part>``.
"""
import math
from typing import Dict, List, Optional

from ..engine import events as ev

OK, WARN, ERROR = b'\x00', b'\x01', b'\x02'


def _values(pairs) -> list:
    from diagnostic_msgs.msg import KeyValue
    out = []
    for key, value in pairs:
        if isinstance(value, float):
            value = 'nan' if math.isnan(value) else f'{value:.4g}'
        out.append(KeyValue(key=key, value=str(value)))
    return out


def _status(name: str, level: bytes, message: str, pairs):
    from diagnostic_msgs.msg import DiagnosticStatus
    return DiagnosticStatus(level=level, name=name, message=message, hardware_id='',
                            values=_values(pairs))


def diagnostic_array(node_name: str, stamp, model: Dict[str, str], stats: ev.EngineStats,
                     cameras: List[dict], stale_sec: float, now_sec: Optional[float],
                     lifecycle_state: str = 'active'):
    """One DiagnosticArray.

    :param node_name: the node's name (status names are ``<node_name>: <part>``).
    :param stamp: ``builtin_interfaces/Time`` of the array (the node clock).
    :param model: 'path', 'device', 'dtype', 'attention' ('' where unknown).
    :param stats: the engine's counters as Status reports them (state 'unloaded' without an
        engine, 'inactive' while the node is not active).
    :param cameras: per camera topic: 'topic', 'last_stamp_sec' (None: no frame yet),
        'images' (image messages received), 'invalid', and 'camera': the
        :class:`~mossv_ros.engine.events.CameraStats` of the camera it feeds (None without an
        engine): its frames, drops, cache and lag are that camera's, not the node's totals.
    :param stale_sec: a camera silent longer than this (stamp time) is WARN.
    :param now_sec: the node clock, seconds (None while a sim clock has not started).
    :param lifecycle_state: the node's lifecycle state; an inactive node is WARN with
        'inactive' in the message (not a fault, but a monitor that reads only levels must see
        that it refuses questions).
    """
    from diagnostic_msgs.msg import DiagnosticArray
    state = stats.state
    loaded = state in ('ready', 'error', 'inactive')
    statuses = []
    if state == 'error':
        level, message = ERROR, f'engine error: {stats.last_error}'
    elif state == 'loading':
        level, message = WARN, 'loading'
    elif not loaded and stats.last_error:  # a failed configure (e.g. the memory plan)
        level, message = ERROR, f'not loaded: {stats.last_error}'[:500]
    elif not loaded:
        level, message = WARN, 'no model loaded (set model.path)'
    else:
        level, message = OK, 'loaded'
    statuses.append(_status(f'{node_name}: model', level, message, [
        ('loaded', loaded), ('path', model.get('path', '')), ('device', model.get('device', '')),
        ('dtype', model.get('dtype', '')), ('attention', model.get('attention', '')),
        ('quantization', stats.quantization), ('weight_bytes', stats.weight_bytes),
        ('planned_memory_bytes', stats.planned_memory_bytes),
        ('measured_memory_bytes', stats.measured_memory_bytes),
        ('available_memory_bytes', stats.available_memory_bytes),
        ('memory_plan', model.get('memory_plan', ''))]))
    m = stats.last_metrics or ev.RoundMetrics()
    # inactive is WARN, not OK: a monitor that reads only levels must see that questions are
    # refused (the message says it is the lifecycle, not a fault)
    engine_level = ERROR if state == 'error' else (OK if state == 'ready' else WARN)
    engine_message = (f'inactive (lifecycle {lifecycle_state}): questions are rejected'
                      if state == 'inactive' else state)
    if engine_level == OK and 'failed' in stats.decode_path:  # capture or compilation
        engine_level, engine_message = WARN, f'{state}, {stats.decode_path}'
    if engine_level == OK and stats.num_oom_events:
        engine_level, engine_message = WARN, (
            f'{state}, device out of memory {stats.num_oom_events} time(s) (frames evicted, '
            'or the step runs eagerly): see the memory plan')
    statuses.append(_status(f'{node_name}: engine', engine_level, engine_message, [
        ('state', state), ('lifecycle_state', lifecycle_state),
        ('decode_path', stats.decode_path),
        ('ttft_sec', float(m.ttft_sec)), ('itl_sec', float(m.itl_sec)),
        ('frame_lag_sec', float(m.frame_lag_sec)),
        ('num_context_tokens', stats.num_context_tokens),
        ('current_round_id', stats.current_round_id),
        ('num_rounds_started', stats.num_rounds_started),
        ('num_rounds_answered', stats.num_rounds_answered),
        ('num_rounds_cancelled', stats.num_rounds_cancelled),
        ('num_rounds_failed', stats.num_rounds_failed),
        ('num_session_resets', stats.num_session_resets),
        ('num_oom_events', stats.num_oom_events), ('last_error', stats.last_error)]))
    for cam in cameras:
        statuses.append(_camera_status(node_name, cam, stale_sec, now_sec))
    msg = DiagnosticArray(status=statuses)
    msg.header.stamp = stamp
    return msg


def _camera_status(node_name: str, cam: dict, stale_sec: float, now_sec: Optional[float]):
    last = cam['last_stamp_sec']
    gap = math.nan if last is None or now_sec is None else max(0.0, now_sec - last)
    if last is None:
        level, message = WARN, 'no frame yet'
    elif gap > stale_sec:
        level, message = WARN, f'no frame for {gap:.1f} s'
    else:
        level, message = OK, 'receiving'
    figures = cam.get('camera') or ev.CameraStats()
    m = figures.last_metrics or ev.RoundMetrics()
    return _status(f'{node_name}: camera {cam["topic"]}', level, message, [
        ('topic', cam['topic']), ('camera', figures.name), ('frame_gap_sec', gap),
        ('frame_lag_sec', float(m.frame_lag_sec)),
        ('num_images', cam['images']), ('num_invalid_frames', cam['invalid']),
        ('num_frames_received', figures.num_frames_received),
        ('num_dropped_frames', figures.num_dropped_frames),
        ('num_frames_cached', figures.num_frames_cached),
        ('cache_bytes', figures.cache_bytes)])
