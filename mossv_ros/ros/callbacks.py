"""Wrappers of the node's callbacks: the node never dies from a callback, and rclpy's
swallowed transition errors are logged."""
import contextlib
import functools
import logging

from rclpy.lifecycle import TransitionCallbackReturn


@contextlib.contextmanager
def warnings_to(ros_logger):
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


def never_raises(method):
    """For timer and event callbacks: an exception is logged (a warning of its own) and the
    node goes on; it would otherwise end the executor's spin and the process."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - logged; the node must keep running
            self.warnings.set(f'callback:{method.__name__}', f'{method.__name__} failed: '
                              f'{type(exc).__name__}: {exc}', recurring=True)
    return wrapper


def logged_transition(method):
    """rclpy swallows exceptions in transition callbacks; log them and return FAILURE."""
    @functools.wraps(method)
    def wrapper(self, state):
        try:
            return method(self, state)
        except Exception as exc:  # noqa: BLE001 - becomes a lifecycle FAILURE with a log
            self.get_logger().error(f'{method.__name__} failed: {type(exc).__name__}: {exc}')
            return TransitionCallbackReturn.FAILURE
    return wrapper
