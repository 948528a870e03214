"""``main``: the assistant node run unmanaged (``mossv-ros run``, ``ros2 run``, the launch
file), configured and activated on its own."""
import threading

import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.lifecycle import TransitionCallbackReturn

from .executor import MultiThreadedExecutor
from .node import AssistantNode


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
