"""The assistant lifecycle node: wiring of the lifecycle, the parameters and the publishers.

Jobs live in modules of their own: camera topics in (:mod:`.ingest`), requests in
(:mod:`.intake`), Status and /diagnostics (:mod:`.status`), ``~/overlay`` (:mod:`.overlay`), the
action (:mod:`.action`), messages (:mod:`.convert`); the engine decides. Engine events cross
into the executor through a guard condition (ros2/examples ``trigger_guard_condition.py``).
"""
import itertools
import time
from typing import Callable, Optional

from diagnostic_msgs.msg import DiagnosticArray
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image

from ..engine import events as ev
from ..engine.config import EngineConfig, model_name
from ..engine.engine import StreamingEngine
from ..engine.reclaim import release_freed_memory
from . import convert
from .callbacks import logged_transition, never_raises, warnings_to
from .gate import ParameterGate
from .ingest import CameraIngest, GRAPH_CHECK_SEC
from .intake import RequestIntake
from .overlay import OverlayPublisher
from .params import (
    camera_topics,
    engine_config_from_params,
    engine_defaults,
    NODE_DEFAULTS,
    validate_node_params,
)
from .status import StatusReporter, Warnings


class AssistantNode(LifecycleNode):
    """Managed node ``mossv_assistant``: configure loads the model, activate opens the camera
    topics. Publishes ``~/tokens``, ``~/silence`` (while active), ``~/answer``, ``~/status``,
    ``~/overlay`` and ``/diagnostics``; takes ``~/question``, ``~/ask``, ``~/reset`` and the
    ``~/answer_question`` action in every state; subscribes ``image`` (``topics.images``, or
    ``image/compressed`` with ``topics.transport`` compressed) while active.

    :param load_progress: ``progress(done_files, total_files)`` while weights load.
    """

    def __init__(self, node_name: str = 'mossv_assistant',
                 load_progress: Optional[Callable[[int, int], None]] = None, **kwargs) -> None:
        super().__init__(node_name, **kwargs)
        self._load_progress = load_progress
        self.engine: Optional[StreamingEngine] = None
        self.engine_config: Optional[EngineConfig] = None
        self.loading = self.active = self.engine_failed = False
        #: why the last configure failed ('' when it did not): Status, /diagnostics and every
        #: refused request say it
        self.configure_error = ''
        self._round_ids = itertools.count(1)  # one counter for every engine of the node
        self._param_defaults = {**engine_defaults(), **NODE_DEFAULTS}
        self._gate = ParameterGate.declare(self, self._param_defaults)
        self._events_cb = MutuallyExclusiveCallbackGroup()
        self.warnings = Warnings(self.get_logger().warning)
        from mossv_ros.msg import Answer, Silence, Status, Token
        # The token stream and silence events go out while Active; Answers (finals,
        # rejections, cancellations) and Status in every state.
        self._pubs = {'tokens': self.create_lifecycle_publisher(Token, '~/tokens', 100),
                      'silence': self.create_lifecycle_publisher(Silence, '~/silence', 100),
                      'answer': self.create_publisher(Answer, '~/answer', 1000),
                      'status': self.create_publisher(Status, '~/status', 10)}
        self._guard = self.create_guard_condition(self._drain_events,
                                                  callback_group=self._events_cb)
        self.intake = RequestIntake(self, self._pubs['answer'], MutuallyExclusiveCallbackGroup())
        self.ingest = CameraIngest(self, self.warnings, MutuallyExclusiveCallbackGroup())
        self.status = StatusReporter(self, self.ingest, self.warnings, self._pubs['status'],
                                     self.create_publisher(DiagnosticArray, '/diagnostics', 10))
        self._overlay = OverlayPublisher(self.create_publisher(Image, '~/overlay',
                                                               qos_profile_sensor_data))
        self._node_timers = {}
        self._start_timers('diagnostics')

    def set_parameters_atomically(self, parameter_list):
        """rclpy refuses an undeclared parameter with 'undeclared parameter(s): []'; the gate
        says which, and the closest declared name."""
        return (self._gate.refuse_unknown(parameter_list)
                or super().set_parameters_atomically(parameter_list))

    def destroy_node(self):
        self._overlay.close()  # the action server is a waitable: destroy_node destroys it
        return super().destroy_node()

    # ------------------------------------------------------------------ state
    def param(self, name: str):
        """One parameter as its declared type (an invalid value reads as the default; configure
        refuses it with the reason)."""
        return self._gate.value(name)

    def camera_config(self):
        """(camera names, their topics) from ``cameras.names`` / ``cameras.topics``."""
        return camera_topics({'cameras.names': self.param('cameras.names'),
                              'cameras.topics': self.param('cameras.topics')})

    def lifecycle_state(self) -> str:
        return self._state_machine.current_state[1]

    def model_name(self) -> str:
        return model_name(str(self.param('model.path')))

    # ------------------------------------------------------------------ lifecycle
    @logged_transition
    def on_configure(self, state) -> TransitionCallbackReturn:
        self.configure_error = ''
        try:
            values = self._gate.values()
            config = engine_config_from_params(values)
            validate_node_params(values)
        except ValueError as exc:
            return self._failed(f'invalid parameters: {exc}')
        self.engine_config = config
        self._start_timers('status', 'diagnostics')
        if self.engine is not None and self.engine.config == config:
            # re-configure after an engine failure: same model, fresh session, no reload
            self.engine.reset('reconfigured')
            return self._started(self.engine, 60.0)
        self._stop_engine()
        if not config.model_path:
            self.get_logger().warning('model.path is empty: running with no model loaded '
                                      '(Status UNLOADED; Ask answers "model not loaded")')
            return TransitionCallbackReturn.SUCCESS
        return self._load(config)

    def _load(self, config: EngineConfig) -> TransitionCallbackReturn:
        from ..engine.checkpoint import CheckpointError
        from ..engine.memory import MemoryPlanError
        from ..engine.runner import ModelRunner
        self.get_logger().info(f'loading {config.model_path} (engine.device {config.device}, '
                               f'engine.dtype {config.dtype})')
        t0 = time.monotonic()
        self.loading = True
        try:
            with warnings_to(self.get_logger()):  # e.g. the fallback from CUDA to the CPU
                runner = ModelRunner(config, self._load_progress)
                self.engine = StreamingEngine(config, runner=runner,
                                              on_event=self._on_engine_event,
                                              round_ids=self._round_ids)
                self.engine.start()
                ok = self._started(self.engine, 120.0)
        except MemoryPlanError as exc:
            return self._failed(f'does not fit in memory: {exc}')
        except (CheckpointError, ValueError, OSError) as exc:
            return self._failed(f'cannot load model: {exc}')
        finally:
            self.loading = False
        if ok == TransitionCallbackReturn.SUCCESS:
            self._log_ready(runner, time.monotonic() - t0)
        else:  # the engine's model, caches and graphs go before anything new is loaded
            self._stop_engine()
        return ok

    def _failed(self, why: str) -> TransitionCallbackReturn:
        """A failed configure: logged, kept for Status and every refused request; the node
        stays alive and unconfigured (configure again after fixing the cause)."""
        self.configure_error = why
        self.get_logger().error(why)
        release_freed_memory()
        return TransitionCallbackReturn.FAILURE

    def _log_ready(self, runner, seconds: float) -> None:
        self.get_logger().info(
            f'model ready in {seconds:.1f} s ({runner.config.dtype} on {runner.config.device}, '
            f'attention: {runner.attn_implementation}, text step: '
            f'{self.engine.stats().decode_path})')

    def _started(self, engine: StreamingEngine, timeout: float) -> TransitionCallbackReturn:
        if engine.wait_ready(timeout):
            return TransitionCallbackReturn.SUCCESS
        return self._failed(f'engine failed to start: {engine.stats().last_error}')

    def _start_timers(self, *names: str) -> None:
        """(Re)start the named timers at their periods, on the steady clock: with
        use_sim_time and no /clock yet (a bag not playing) a ROS-time timer would never fire
        and the node would look dead."""
        periods = {'status': (self.param('status.period_sec'), self._publish_status),
                   'diagnostics': (self.param('diagnostics.period_sec'),
                                   self._publish_diagnostics),
                   'graph': (GRAPH_CHECK_SEC, self._check_graph)}
        for name in names:
            if self._node_timers.get(name) is not None:
                self.destroy_timer(self._node_timers[name])
            period, callback = periods[name]
            self._node_timers[name] = self.create_timer(
                period, callback, callback_group=self._events_cb,
                clock=Clock(clock_type=ClockType.STEADY_TIME))

    @logged_transition
    def on_activate(self, state) -> TransitionCallbackReturn:
        if self.engine is not None and self.engine.state == 'error':
            # a lifecycle cycle (deactivate -> activate) recovers from an engine error
            self.get_logger().warning('engine was in ERROR: restarting it with a fresh session')
            self.engine.reset('lifecycle re-activation after an error')
        topics = self.ingest.open()
        if not topics:
            self.get_logger().warning('no image topics (topics.images is empty): questions '
                                      'are answered from text only')
        self._start_timers('graph')
        self.get_logger().info('active: listening on ' + ', '.join(topics))
        self.active, self.engine_failed = True, False
        return super().on_activate(state)

    def on_deactivate(self, state) -> TransitionCallbackReturn:
        self.active = False
        self._close_io()
        if self.engine is not None:  # open and waiting rounds end with a final Answer
            self.engine.end_rounds('deactivated')
        if self.engine_failed:
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
        """Cleanup and shutdown alike: the camera topics closed, the engine stopped."""
        self._close_io()
        self._stop_engine()
        return TransitionCallbackReturn.SUCCESS

    on_shutdown = on_cleanup

    def _close_io(self) -> None:
        if self._node_timers.get('graph') is not None:
            self.destroy_timer(self._node_timers.pop('graph'))
        self.ingest.close()

    def _stop_engine(self) -> None:
        if self.engine is None:
            return
        self.engine.stop(timeout=2.0)
        self._drain_events()
        self.intake.action.abort_all('shutdown')  # goals the engine left without a final
        self.engine = None  # the last reference: model, caches and graphs are freed here
        release_freed_memory()

    # ------------------------------------------------------------------ events out
    def _on_image(self, msg: Image) -> None:
        """A raw image on the default topic (tests and in-process users call this)."""
        self.ingest.on_image(msg, convert.image_to_rgb, self.resolve_topic_name('image'))

    def _on_engine_event(self, event) -> None:
        guard = self._guard
        if guard is not None:
            guard.trigger()  # repeated triggers before the drain runs wake it once

    @never_raises
    def _drain_events(self) -> None:
        engine = self.engine
        if engine is not None:
            for event in engine.poll_events():
                self._publish_event(event)

    def _publish_event(self, event) -> None:
        if not self.context.ok():
            return  # shutting down: nothing can be published any more
        if isinstance(event, (ev.TokenEvent, ev.AnswerEvent, ev.RoundEvent)):
            self.intake.action.on_event(event)
        engine = self.engine
        if engine is None or getattr(event, 'camera', '') in ('', engine.config.cameras[0]):
            self._overlay.show(event)  # ~/overlay shows the default camera
        message = convert.event_msg(event)
        if message is not None:
            self._pubs[message[0]].publish(message[1])
        elif isinstance(event, ev.ErrorEvent):
            log = self.get_logger().error if event.fatal else self.get_logger().warning
            log(f'engine: {event.message}')
            if event.fatal and self.active:
                self.engine_failed = True
                self.trigger_deactivate()  # Active -> ErrorProcessing -> Unconfigured
        elif isinstance(event, ev.SessionResetEvent):
            self.get_logger().info(f'session reset: {event.reason}')

    @never_raises
    def _publish_status(self) -> None:
        self.status.publish_status()

    @never_raises
    def _publish_diagnostics(self) -> None:
        self.status.publish_diagnostics()

    @never_raises
    def _check_graph(self) -> None:
        self.ingest.check_graph()
