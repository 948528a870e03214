"""The engine's statistics: counters of the inbox (per camera and totals) and of each
camera's session and dialogue, gathered into one :class:`~.events.EngineStats` snapshot
(Status and /diagnostics read it)."""
from .events import CameraStats, EngineStats


def collect(engine) -> EngineStats:
    """A snapshot of ``engine``'s counters, totals and per camera (cheap; safe from any
    thread; writes nothing).

    :param engine: a :class:`~.engine.StreamingEngine`.
    """
    totals, per = engine.inbox.snapshot()
    s = EngineStats(state=engine.state, model_name=engine.model_name,
                    num_frames_received=totals.num_frames_received,
                    num_dropped_frames=totals.num_dropped_frames,
                    num_frames_encoded=totals.num_frames_encoded,
                    num_rounds_started=totals.num_rounds_started,
                    num_rounds_cancelled=totals.num_questions_cancelled,
                    longest_frame_gap_sec=totals.longest_frame_gap_sec,
                    num_stamp_outliers=totals.num_stamp_outliers,
                    last_error=engine.last_error, decode_path=engine.decode_path)
    runner = engine.runner
    if runner is not None and engine.cameras():
        s.quantization, s.weight_bytes = runner.quantization, runner.weight_bytes
        s.num_oom_events += runner.num_capture_ooms
        plan = runner.memory_plan
        if plan is not None:
            s.planned_memory_bytes = plan.total_bytes
            s.available_memory_bytes = plan.available_bytes
        s.measured_memory_bytes = runner.measured_bytes(engine.cameras()[0].session.pool)
    cams = {cam.name: cam for cam in engine.cameras()}
    for name in engine.config.cameras:
        counts = per.get(name)
        cs = CameraStats(name=name, num_frames_received=counts.num_frames_received,
                         num_dropped_frames=counts.num_dropped_frames,
                         last_stamp_sec=engine.inbox.last_stamp_sec(name))
        cam = cams.get(name)
        if cam is not None:
            _add_camera(s, cs, cam)
        s.cameras.append(cs)
    default = s.cameras[0]
    s.current_round_id = default.current_round_id
    s.newest_frame = default.newest_frame
    ended = [c.last_metrics for c in s.cameras if c.last_metrics is not None]
    if ended:  # the round that ended last, of any camera
        s.last_metrics = max(ended, key=lambda m: m.end_ts)
    return s


def _add_camera(s: EngineStats, cs: CameraStats, cam) -> None:
    """A camera's session and dialogue figures into its CameraStats and the totals."""
    session, dialogue = cam.session, cam.dialogue
    cs.num_frames_cached = session.vision_cache.num_frames
    cs.cache_bytes = session.cache_bytes
    cs.num_context_tokens = session.kv_cache.length
    cs.num_session_resets = cam.num_session_resets
    cs.current_round_id = dialogue.round.round_id
    cs.last_metrics = dialogue.last_metrics
    cs.newest_frame = dialogue.newest
    c = dialogue.counts
    s.num_rounds_answered += c.num_rounds_answered
    s.num_rounds_cancelled += c.num_rounds_cancelled
    s.num_rounds_failed += c.num_rounds_failed
    s.num_frames_cached += cs.num_frames_cached
    s.cache_bytes += cs.cache_bytes
    s.num_context_tokens += cs.num_context_tokens
    s.num_frames_evicted += session.num_evicted_frames
    s.num_session_resets += cam.num_session_resets
    s.num_oom_events += session.num_oom_events
