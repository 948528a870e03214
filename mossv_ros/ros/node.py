"""The assistant lifecycle node: camera topics in; tokens, silence, answers and status out.

Thin: callbacks only convert and enqueue; the engine decides. Engine events cross into the
executor once, through a guard condition (ros2/examples ``trigger_guard_condition.py``).
"""
import contextlib
import functools
import itertools
import logging
import math
import threading
import time
from typing import Callable, List, Optional

from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
import rclpy
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.executors import ExternalShutdownException
from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import qos_profile_sensor_data, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image

from ..engine import events as ev
from ..engine.config import EngineConfig
from ..engine.engine import StreamingEngine
from ..engine.policy import echo
from . import convert
from .action import AnswerQuestionServer
from .diagnostics import diagnostic_array
from .executor import MultiThreadedExecutor
from .overlay import OverlayPublisher, OverlayText
from .params import (
    camera_topics,
    coerce_param,
    engine_config_from_params,
    engine_defaults,
    is_live,
    LIVE_NODE_PARAMS,
    live_summary,
    NODE_DEFAULTS,
    unknown_params,
    validate_node_params,
)


@contextlib.contextmanager
def _warnings_to(ros_logger):
    """Forward the engine's Python-logging warnings (``mossv_ros.engine.*``) to the node's
    ROS logger while the block runs, so they appear in ``ros2 launch`` output and /rosout."""
    class _Forward(logging.Handler):
        def emit(self, record):
            ros_logger.warning(record.getMessage())

    handler = _Forward(level=logging.WARNING)
    engine_log = logging.getLogger('mossv_ros.engine')
    engine_log.addHandler(handler)
    try:
        yield
    finally:
        engine_log.removeHandler(handler)


def _never_raises(method):
    """For timer and event callbacks: an exception is logged (once per 10 s) and the node
    goes on; it would otherwise end the executor's spin and the process."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - logged; the node must keep running
            self._warn(f'callback:{method.__name__}',
                       f'{method.__name__} failed: {type(exc).__name__}: {exc}')
    return wrapper


def _logged_transition(method):
    """rclpy swallows exceptions in transition callbacks; log them and return FAILURE."""
    @functools.wraps(method)
    def wrapper(self, state):
        try:
            return method(self, state)
        except Exception as exc:  # noqa: BLE001 - becomes a lifecycle FAILURE with a log
            self.get_logger().error(f'{method.__name__} failed: {type(exc).__name__}: {exc}')
            return TransitionCallbackReturn.FAILURE
    return wrapper


class AssistantNode(LifecycleNode):
    """Managed node ``mossv_assistant``: configure loads the model, activate opens the I/O.

    Topics (relative, remappable): subscribes ``image`` (parameter ``topics.images``; or
    ``image/compressed`` with ``topics.transport`` compressed) and ``~/question``; publishes
    ``~/tokens``, ``~/silence``, ``~/answer``, ``~/status``, ``~/overlay`` and
    ``/diagnostics``. Services: ``~/ask`` (Ask), ``~/reset`` (Reset). Action:
    ``~/answer_question`` (AnswerQuestion).
    """

    def __init__(self, node_name: str = 'mossv_assistant',
                 load_progress: Optional[Callable[[int, int], None]] = None, **kwargs) -> None:
        """:param load_progress: ``progress(done_files, total_files)`` while weights load."""
        super().__init__(node_name, **kwargs)
        self._load_progress = load_progress
        self._param_defaults = {**engine_defaults(), **NODE_DEFAULTS}
        self._param_names = tuple(self._param_defaults)
        # Dynamic typing: a wrong type (-p frames.rate_hz:=2) gets our validation message
        # (params.coerce_param) at configure or `ros2 param set`, not a traceback here.
        dynamic = ParameterDescriptor(dynamic_typing=True)
        for name, value in self._param_defaults.items():
            self.declare_parameter(name, value, dynamic)
        # An empty YAML list (`topics.images: []`) arrives as a NOT_SET override, which
        # rclpy drops in favour of the default: it means "none", so make it an empty list.
        for name, override in self._parameter_overrides.items():
            if (isinstance(self._param_defaults.get(name), list)
                    and override.type_ == Parameter.Type.NOT_SET):
                self.set_parameters([Parameter(name, Parameter.Type.STRING_ARRAY, [])])
        unknown = unknown_params(self._parameter_overrides, self._parameters)
        if unknown:
            self.get_logger().warning('unknown parameters, ignored: ' + ', '.join(unknown))
        # `ros2 param set`: validated first (a bad value is refused with the reason), then
        # the live ones are applied at once (params.is_live); the others wait for configure.
        self.add_on_set_parameters_callback(self._check_parameters)
        self.add_post_set_parameters_callback(self._apply_parameters)
        self.engine: Optional[StreamingEngine] = None
        self.engine_config: Optional[EngineConfig] = None
        self._io: List = []
        self._num_invalid = 0
        self._num_images_seen = 0  # since the last activation (the no-frame warning)
        self._warning = ('', 0.0)  # (text, monotonic time) for Status.warning
        self._no_frame_timer = None
        self._error_log_ts = {}
        self._events_cb = MutuallyExclusiveCallbackGroup()
        self._image_cb = MutuallyExclusiveCallbackGroup()
        self._service_cb = MutuallyExclusiveCallbackGroup()
        self._status_timer = None
        self._loading = False
        self._active = False
        self._engine_failed = False  # a fatal engine error took the node out of Active
        #: round ids for the node's lifetime: every engine it creates draws from this one
        #: counter, so rounds of different configures never share an id
        self._round_ids = itertools.count(1)
        from mossv_ros.srv import Ask, Reset
        # Services exist in every lifecycle state, so a caller always gets a reason
        # ("model loading", "not active") instead of a missing service.
        # Deep queues (the default keeps 10): a burst of 200 Ask calls or Questions must not
        # lose any at the DDS level; every one gets its response / final Answer.
        self._ask_srv = self.create_service(Ask, '~/ask', self._on_ask,
                                            qos_profile=REQUEST_QOS,
                                            callback_group=self._service_cb)
        self._reset_srv = self.create_service(Reset, '~/reset', self._on_reset,
                                              callback_group=self._service_cb)
        # Publishers, the engine-event guard and ~/question are created once, here: a
        # configure never adds another set, and a Question in any lifecycle state gets its
        # final Answer (a rejection that says why while the node is not active). Lifecycle
        # semantics: the token stream and silence events go out only while Active; Answers
        # (finals, rejections, cancellations) and Status in every state.
        from mossv_ros.msg import Answer, Question, Silence, Status, Token
        self._pubs = {
            'tokens': self.create_lifecycle_publisher(Token, '~/tokens', 100),
            'silence': self.create_lifecycle_publisher(Silence, '~/silence', 100),
            'answer': self.create_publisher(Answer, '~/answer', 1000),  # bursts: all final
            'status': self.create_publisher(Status, '~/status', 10),
        }
        self._guard = self.create_guard_condition(self._drain_events,
                                                  callback_group=self._events_cb)
        self._question_sub = self.create_subscription(
            Question, '~/question', self._on_question, REQUEST_QOS,
            callback_group=self._service_cb)
        # Robot interfaces: the action (every state, like ~/ask), /diagnostics, ~/overlay.
        self._answer_action = AnswerQuestionServer(self, self._submit, self._cancel_round,
                                                   callback_group=ReentrantCallbackGroup())
        self._diagnostics_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        self._diagnostics_timer = None
        self._overlay = OverlayPublisher(self.create_publisher(Image, '~/overlay',
                                                               qos_profile_sensor_data))
        self._say = OverlayText()
        self._overlay_frame: Optional[ev.FrameEvent] = None  # the newest frame taken
        self._camera_counts = {}  # topic -> [images received, invalid]
        self._start_timers()

    def destroy_node(self):
        self._overlay.close()  # the action server is a waitable: destroy_node destroys it
        return super().destroy_node()

    # ------------------------------------------------------------------ lifecycle
    @_logged_transition
    def on_configure(self, state) -> TransitionCallbackReturn:
        try:
            values = self._param_values()
            config = engine_config_from_params(values)
            validate_node_params(values)
        except ValueError as exc:
            self.get_logger().error(f'invalid parameters: {exc}')
            return TransitionCallbackReturn.FAILURE
        self.engine_config = config
        self._start_timers(status=True)
        if self.engine is not None and self.engine.config == config:
            # re-configure after an engine failure: same model, fresh session, no reload
            self.engine.reset('reconfigured')
            if not self.engine.wait_ready(60.0):
                self.get_logger().error('engine failed to restart: '
                                        f'{self.engine.stats().last_error}')
                return TransitionCallbackReturn.FAILURE
            return TransitionCallbackReturn.SUCCESS
        self._stop_engine()
        if not config.model_path:
            self.get_logger().warning('model.path is empty: running with no model loaded '
                                      '(Status UNLOADED; Ask answers "model not loaded")')
            return TransitionCallbackReturn.SUCCESS
        from ..engine.checkpoint import CheckpointError
        from ..engine.runner import ModelRunner
        self.get_logger().info(f'loading {config.model_path} (engine.device {config.device}, '
                               f'engine.dtype {config.dtype})')
        t0 = time.monotonic()
        self._loading = True
        try:
            with _warnings_to(self.get_logger()):  # e.g. the fallback from CUDA to the CPU
                runner = ModelRunner(config, self._load_progress)
        except (CheckpointError, ValueError, OSError) as exc:
            self.get_logger().error(f'cannot load model: {exc}')
            return TransitionCallbackReturn.FAILURE
        finally:
            self._loading = False
        self.engine = StreamingEngine(config, runner=runner, on_event=self._on_engine_event,
                                      round_ids=self._round_ids)
        self.engine.start()
        if not self.engine.wait_ready(120.0):
            self.get_logger().error(f'engine failed to start: {self.engine.stats().last_error}')
            return TransitionCallbackReturn.FAILURE
        self.get_logger().info(f'model ready in {time.monotonic() - t0:.1f} s '
                               f'({runner.config.dtype} on {runner.config.device}, '
                               f'attention: {runner.attn_implementation})')
        return TransitionCallbackReturn.SUCCESS

    def _start_timers(self, status: bool = False) -> None:
        """(Re)start the /diagnostics timer and, with ``status``, the Status timer, at
        their periods. Both run on the steady clock: with use_sim_time and no /clock yet (a
        bag not playing) a ROS-time timer would never fire and the node would look dead."""
        steady = Clock(clock_type=ClockType.STEADY_TIME)
        names = ['_diagnostics_timer'] + (['_status_timer'] if status else [])
        for name in names:
            if getattr(self, name) is not None:
                self.destroy_timer(getattr(self, name))
        self._diagnostics_timer = self.create_timer(
            self._param('diagnostics.period_sec'), self._publish_diagnostics,
            callback_group=self._events_cb, clock=steady)
        if status:
            self._status_timer = self.create_timer(
                self._param('status.period_sec'), self._publish_status,
                callback_group=self._events_cb, clock=steady)

    # ------------------------------------------------------------------ parameters
    def _param_values(self, changes: Optional[dict] = None) -> dict:
        """Our parameters' values (with ``changes`` applied), each coerced to its declared
        type. :raises ValueError: a value of the wrong type, named."""
        values = {name: self.get_parameter(name).value for name in self._param_names}
        values.update(changes or {})
        return {name: coerce_param(name, value, self._param_defaults[name])
                for name, value in values.items()}

    def _param(self, name: str):
        """One parameter, as its declared type. An invalid value (configure refuses it with
        the reason) reads as the default here, so a timer never fails on it."""
        default = self._param_defaults[name]
        try:
            return coerce_param(name, self.get_parameter(name).value, default)
        except ValueError:
            return default

    def _check_parameters(self, params) -> SetParametersResult:
        """Refuse an invalid value (the validation message is the reason) and, while the
        node is configured, a parameter that only a new configure can apply."""
        ours = {p.name: p.value for p in params if p.name in self._param_names}
        if not ours:
            return SetParametersResult(successful=True)
        state = self._lifecycle_state()
        fixed = sorted(name for name in ours if not is_live(name))
        if fixed and (state != 'unconfigured' or self._loading):
            return SetParametersResult(successful=False, reason=(
                f'{", ".join(fixed)} cannot change while the node is {state}: deactivate and '
                'clean up the node (ros2 lifecycle set), set it, then configure again. Live '
                f'parameters: {live_summary(self._param_names)}'))
        try:
            values = self._param_values(ours)
            engine_config_from_params(values)
            validate_node_params(values)
        except (ValueError, TypeError) as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        return SetParametersResult(successful=True)

    def _apply_parameters(self, params) -> None:
        """Apply accepted live parameters at once (Status period, engine sampling, prompt,
        round and frame-rate settings); the rest are read at the next configure."""
        names = {p.name for p in params if p.name in self._param_names}
        if not names or self._lifecycle_state() == 'unconfigured':
            return
        if 'status.period_sec' in names and self._status_timer is not None:
            self._start_timers(status=True)
        if self.engine is not None and names - set(LIVE_NODE_PARAMS):
            config = engine_config_from_params(self._param_values())
            self.engine.update_config(config)
            self.engine_config = config
        self.get_logger().info('parameters applied: ' + ', '.join(sorted(names)))

    # ------------------------------------------------------------------ lifecycle (cont.)
    @_logged_transition
    def on_activate(self, state) -> TransitionCallbackReturn:
        reliability = self._param('qos.image_reliability')
        if self.engine is not None and self.engine.state == 'error':
            # a lifecycle cycle (deactivate -> activate) recovers from an engine error
            self.get_logger().warning('engine was in ERROR: restarting it with a fresh session')
            self.engine.reset('lifecycle re-activation after an error')
        qos = QoSProfile(depth=1, history=qos_profile_sensor_data.history,
                         durability=qos_profile_sensor_data.durability,
                         reliability=(ReliabilityPolicy.BEST_EFFORT if reliability ==
                                      'best_effort' else ReliabilityPolicy.RELIABLE))
        compressed = self._param('topics.transport') == 'compressed'
        names, camera_topics = self._camera_config()
        if names:  # a session per camera: one image topic each
            pairs = list(zip(camera_topics, names))
        else:  # the single-camera configuration: every topic feeds the default camera
            pairs = [(t, '') for t in self._param('topics.images') if t]
        topics = [(CompressedImage, f'{t}/compressed', cam) if compressed else (Image, t, cam)
                  for t, cam in pairs]
        topics += [(CompressedImage, t, '') for t in self._param('topics.compressed_images')
                   if t and not names]
        for msg_type, topic, camera in topics:
            topic = self.resolve_topic_name(topic)  # one name per camera: logs, counts, stamps
            to_rgb = (convert.compressed_to_rgb if msg_type is CompressedImage
                      else convert.image_to_rgb)
            events = SubscriptionEventCallbacks(incompatible_qos=functools.partial(
                self._on_incompatible_qos, topic=topic))
            self._io.append(self.create_subscription(
                msg_type, topic, functools.partial(self._ingest, to_rgb=to_rgb, topic=topic,
                                                   camera=camera),
                qos, callback_group=self._image_cb, event_callbacks=events))
        if not topics:
            self.get_logger().warning('no image topics (topics.images is empty): questions '
                                      'are answered from text only')
        self._num_images_seen = 0
        self._no_frame_timer = self.create_timer(NO_FRAME_WARNING_SEC, self._check_no_frames,
                                                 callback_group=self._events_cb,
                                                 clock=Clock(clock_type=ClockType.STEADY_TIME))
        self.get_logger().info('active: listening on ' + ', '.join(
            s.topic_name for s in self._io if hasattr(s, 'topic_name')))
        self._active = True
        self._engine_failed = False
        return super().on_activate(state)

    def on_deactivate(self, state) -> TransitionCallbackReturn:
        self._active = False
        self._close_io()
        if self.engine is not None:  # open and waiting rounds end with a final Answer
            self.engine.end_rounds('deactivated')
        if self._engine_failed:
            # Leaving Active because the engine failed: go through ErrorProcessing
            # (on_error) to Unconfigured; configure + activate or ~/reset recover.
            return TransitionCallbackReturn.ERROR
        return super().on_deactivate(state)

    def on_error(self, state) -> TransitionCallbackReturn:
        """ErrorProcessing (after on_deactivate closed the I/O): keep the failed engine, so
        configure can restart it without reloading the model."""
        self.get_logger().error('lifecycle: error processing after an engine failure; now '
                                'unconfigured (recover with ~/reset or configure + activate)')
        return TransitionCallbackReturn.SUCCESS

    def on_cleanup(self, state) -> TransitionCallbackReturn:
        self._close_io()
        self._stop_engine()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state) -> TransitionCallbackReturn:
        self._close_io()
        self._stop_engine()
        return TransitionCallbackReturn.SUCCESS

    def _close_io(self) -> None:
        if self._no_frame_timer is not None:
            self.destroy_timer(self._no_frame_timer)
            self._no_frame_timer = None
        for entity in self._io:
            if hasattr(entity, 'srv_type'):
                self.destroy_service(entity)
            else:
                self.destroy_subscription(entity)
        self._io = []

    def _lifecycle_state(self) -> str:
        return self._state_machine.current_state[1]

    def _stop_engine(self) -> None:
        if self.engine is not None:
            self.engine.stop(timeout=2.0)
            self._drain_events()
            self._answer_action.abort_all('shutdown')  # goals the engine left without a final
            self.engine = None
            try:
                import torch
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except ImportError:
                pass

    # ------------------------------------------------------------------ inputs
    def _warn(self, kind: str, message: str) -> None:
        """A warning in the log (at most once per kind per 10 s) and in Status.warning."""
        now = time.monotonic()
        self._warning = (message, now)
        if now - self._error_log_ts.get(kind, -math.inf) > 10.0:
            self._error_log_ts[kind] = now
            self.get_logger().warning(message)

    def _on_image(self, msg: Image) -> None:
        """A raw image on the default topic (tests and in-process users call this)."""
        self._ingest(msg, convert.image_to_rgb, self.resolve_topic_name('image'))

    def _camera_config(self):
        """(camera names, their topics) from ``cameras.names`` / ``cameras.topics``."""
        return camera_topics({'cameras.names': self._param('cameras.names'),
                              'cameras.topics': self._param('cameras.topics')})

    def _ingest(self, msg, to_rgb, topic: str, camera: str = '') -> None:
        self._num_images_seen += 1
        counts = self._camera_counts.setdefault(topic, [0, 0])
        counts[0] += 1
        if self.engine is None:
            return
        stamp = msg.header.stamp
        stamp_sec = convert.stamp_to_sec(stamp)
        if stamp_sec == 0.0:  # a driver without stamps: the node clock stands in, on outputs too
            now = self.get_clock().now()
            if now.nanoseconds == 0:
                self._warn('untimed', f'images on {topic} have zero stamps and the node clock '
                           'is zero (use_sim_time without /clock?): they cannot be timed and '
                           'are skipped; publish /clock (mossv-ros bag play --clock)')
                return
            stamp, stamp_sec = now.to_msg(), now.nanoseconds * 1e-9
            self._warn('zero_stamp', f'images on {topic} have zero stamps: the node clock '
                       'stamps them and their outputs')
        verdict = self.engine.admit(stamp_sec, topic, camera)
        if verdict == 'skip':
            return  # subsampled to frames.rate_hz (or an odd stamp) before any conversion
        try:
            rgb = to_rgb(msg)
        except convert.ImageError as exc:
            self._num_invalid += 1
            counts[1] += 1
            self._warn(exc.kind, f'skipped image ({exc.kind}): {exc} '
                       f'[{self._num_invalid} invalid so far]')
            return
        self.engine.submit_frame(ev.Frame(rgb, stamp, msg.header.frame_id),
                                 stamp_sec=stamp_sec, admitted=verdict, camera=camera,
                                 topic=topic)

    def _on_incompatible_qos(self, event, topic: str) -> None:
        """A camera publisher this subscription can never match (rclpy QoS event)."""
        self._warn('incompatible_qos', f'a publisher on {topic} has a QoS incompatible with '
                   f'this node (policy {event.last_policy_kind.name}, {event.total_count} '
                   'so far): no frame from it arrives; with a best-effort camera set '
                   'qos.image_reliability:=best_effort')

    @_never_raises
    def _check_no_frames(self) -> None:
        """Once, some seconds after activation: no image yet? Say why if the graph shows it
        (a topic of another type under the expected name, frames on ``<topic>/compressed``)."""
        self.destroy_timer(self._no_frame_timer)
        if self._num_images_seen or not self._active:
            return
        published = dict(self.get_topic_names_and_types())
        hints = []
        for sub in self._io:
            name = getattr(sub, 'topic_name', '')
            ours = sub.msg_type.__name__ if hasattr(sub, 'msg_type') else ''
            other = [t for t in published.get(name, []) if not t.endswith('/' + ours)]
            if other and not name.endswith('/question'):
                hints.append(f'{name} is published as {other[0]}, the node expects {ours}')
            if ours == 'Image' and 'sensor_msgs/msg/CompressedImage' in published.get(
                    name + '/compressed', []):
                hints.append(f'frames are published on {name}/compressed: set '
                             'topics.transport:=compressed')
            if (ours == 'Image' and not other and self.count_publishers(name)
                    and self._param('qos.image_reliability') == 'best_effort'):
                hints.append(f'{name} has a publisher but nothing arrives: raw images between '
                             'processes over best effort are mostly lost by the transport '
                             '(README, QoS): use qos.image_reliability:=reliable with a '
                             'reliable camera, or compressed images')
        self._warn('no_frames', f'no image in {NO_FRAME_WARNING_SEC:.0f} s since activation'
                   + (': ' + '; '.join(hints) if hints else ' (is the camera publishing?)'))

    def _submit(self, text: str, request_id: str, camera: str = ''):
        if self._loading:
            return False, 0, 'not ready: the model is loading'
        if not self._active:
            why = ' after an engine error' if self._engine_failed else ''
            return False, 0, (f'not ready: the node is {self._lifecycle_state()}{why} '
                              '(activate it, or call ~/reset after an error)')
        if self.engine is None:
            return False, 0, 'model not loaded (set model.path)'
        return self.engine.submit_question(text, request_id, camera)

    def _cancel_round(self, round_id: int, reason: str) -> None:
        if self.engine is not None:
            self.engine.cancel_round(round_id, reason)

    def _on_ask(self, request, response):
        response.accepted, response.round_id, response.message = self._submit(
            request.prompt, request.request_id, request.camera)
        return response

    def _on_question(self, msg) -> None:
        accepted, round_id, message = self._submit(msg.text, msg.request_id, msg.camera)
        if not accepted:
            self.get_logger().warning(f'question {echo(msg.request_id, 64)!r} rejected: '
                                      f'{message}')
            self._pubs['answer'].publish(convert.rejected_answer_msg(
                msg.request_id, msg.text, message, msg.camera))

    def _on_reset(self, request, response):
        if self.engine is None:
            response.success, response.message = False, 'model not loaded'
        elif self._engine_failed and not self._active:
            # recover from an engine failure: back to Active through the lifecycle
            ok = (self._lifecycle_state() != 'unconfigured'
                  or self.trigger_configure() == TransitionCallbackReturn.SUCCESS)
            ok = ok and self.trigger_activate() == TransitionCallbackReturn.SUCCESS
            response.success = bool(ok)
            response.message = ('recovered: session reset, node active again' if ok else
                                f'recovery failed: {self.engine.stats().last_error}')
        else:
            self.engine.reset('reset service')
            response.success, response.message = True, 'session reset'
        return response

    # ------------------------------------------------------------------ outputs
    def _on_engine_event(self, event) -> None:
        guard = self._guard
        if guard is not None:
            guard.trigger()  # repeated triggers before the drain runs wake it once

    @_never_raises
    def _drain_events(self) -> None:
        engine = self.engine
        if engine is None:
            return
        for event in engine.poll_events():
            self._publish_event(event)

    def _publish_event(self, event) -> None:
        if not self.context.ok():
            return  # shutting down: nothing can be published any more
        pubs = self._pubs
        if isinstance(event, (ev.TokenEvent, ev.AnswerEvent, ev.RoundEvent)):
            self._answer_action.on_event(event)
        engine = self.engine
        if engine is None or getattr(event, 'camera', '') in ('', engine.config.cameras[0]):
            self._update_overlay(event)  # ~/overlay shows the default camera
        if isinstance(event, ev.TokenEvent):
            pubs['tokens'].publish(convert.token_msg(event))
        elif isinstance(event, ev.SilenceEvent):
            pubs['silence'].publish(convert.silence_msg(event))
        elif isinstance(event, ev.AnswerEvent):
            pubs['answer'].publish(convert.answer_msg(event))
        elif isinstance(event, ev.RoundEvent) and event.kind == 'cancelled':
            pubs['answer'].publish(convert.cancelled_answer_msg(event))
        elif isinstance(event, ev.ErrorEvent):
            log = self.get_logger().error if event.fatal else self.get_logger().warning
            log(f'engine: {event.message}')
            if event.fatal and self._active:
                self._engine_failed = True
                self.trigger_deactivate()  # Active -> ErrorProcessing -> Unconfigured
        elif isinstance(event, ev.SessionResetEvent):
            self.get_logger().info(f'session reset: {event.reason}')

    def _update_overlay(self, event) -> None:
        """Keep what ~/overlay says current; hand a frame to the overlay thread when one
        went into the cache (or an utterance ended), only while someone subscribes."""
        say = self._say
        if isinstance(event, ev.RoundEvent) and event.kind == 'started':
            self._say = say = OverlayText(say.frame_index, event.round_id, 0, event.question)
        elif isinstance(event, ev.TokenEvent):
            if event.revision != say.revision or event.round_id != say.round_id:
                say.text = ''
            say.round_id, say.revision = event.round_id, event.revision
            say.text += event.text
        elif isinstance(event, ev.SilenceEvent) and event.is_silent:
            say.text = ''
        elif isinstance(event, ev.RoundEvent) and event.kind == 'ended':
            self._say = say = OverlayText(say.frame_index)
        if isinstance(event, ev.FrameEvent):
            say.frame_index = event.source.frame_index
            self._overlay_frame = event
        frame = self._overlay_frame
        if (frame is not None and isinstance(event, (ev.FrameEvent, ev.AnswerEvent))
                and self._overlay.wanted()):
            header = convert.header_of(frame.source)
            self._overlay.submit(frame.image, header, OverlayText(**vars(say)))

    @_never_raises
    def _publish_diagnostics(self) -> None:
        engine = self.engine
        if self._loading:
            stats = ev.EngineStats(state='loading')
        else:
            stats = engine.stats() if engine else ev.EngineStats(state='unloaded')
        model = {'path': str(self._param('model.path'))}
        if engine is not None and engine.runner is not None:
            cfg = engine.runner.config
            model.update(device=cfg.device, dtype=cfg.dtype,
                         attention=engine.runner.attn_implementation)
        stamps = engine.topic_stamps() if engine else {}
        cameras = [{'topic': topic, 'last_stamp_sec': stamps.get(topic),
                    'received': self._camera_counts.get(topic, [0, 0])[0],
                    'invalid': self._camera_counts.get(topic, [0, 0])[1]}
                   for topic in self._camera_topics()]
        now = self.get_clock().now()
        self._diagnostics_pub.publish(diagnostic_array(
            self.get_name(), now.to_msg(), model, stats, cameras,
            self._param('diagnostics.camera_stale_sec'),
            now.nanoseconds * 1e-9 if now.nanoseconds else None))

    def _camera_topics(self) -> list:
        """The camera topics as the image callbacks name them (while active: subscribed)."""
        return [getattr(sub, 'topic_name', '') for sub in self._io
                if hasattr(sub, 'msg_type') and sub.msg_type in (Image, CompressedImage)]

    @_never_raises
    def _publish_status(self) -> None:
        if 'status' not in self._pubs:
            return
        if self._loading:
            stats = ev.EngineStats(state='loading', model_name=self._model_name())
        else:
            stats = self.engine.stats() if self.engine else ev.EngineStats(state='unloaded')
        # NaN before any image or while the (sim) clock has not started; never negative
        last, now_ns = (self.engine.last_stamp_sec() if self.engine else None,
                        self.get_clock().now().nanoseconds)
        def gap_to(last):
            return math.nan if last is None or now_ns == 0 else max(0.0, now_ns * 1e-9 - last)
        text, ts = self._warning
        warning = text if text and time.monotonic() - ts < 30.0 else ''
        gaps = {c.name: gap_to(c.last_stamp_sec) for c in stats.cameras}
        self._pubs['status'].publish(convert.status_msg(stats, self._num_invalid, gap_to(last),
                                                        warning, gaps))

    def _model_name(self) -> str:
        path = str(self._param('model.path'))
        return path.rstrip('/').split('/')[-1] or 'none'


#: ~/ask and ~/question: reliable, keep the last 1000 (bursts lose nothing)
REQUEST_QOS = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)
#: seconds after activation without any image before the node says so (log, Status)
NO_FRAME_WARNING_SEC = 5.0


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(args=None) -> int:
    """Run the node unmanaged: configure and activate on its own.

    SIGINT and SIGTERM stop the executor while the ROS context is still valid, so the engine
    is stopped and its last events (final answers, cancellations) are still published before
    the context shuts down.
    """
    import signal

    from rclpy.signals import SignalHandlerOptions

    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    signal.signal(signal.SIGINT, _raise_interrupt)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    node = AssistantNode()
    executor = MultiThreadedExecutor(num_threads=4)
    executor.add_node(node)
    result = {}

    def bring_up():  # while the executor already serves ~/ask ("model is loading")
        if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
            node.get_logger().error('configure failed; exiting')
            result['failed'] = True
            executor.wake()
            rclpy.try_shutdown()
            return
        node.trigger_activate()

    threading.Thread(target=bring_up, name='mossv-bring-up', daemon=True).start()
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.get_logger().info('shutting down')
        node._close_io()
        node._stop_engine()
        executor.shutdown(timeout_sec=1.0)
        node.destroy_node()
        rclpy.try_shutdown()
    return 1 if result.get('failed') else 0
