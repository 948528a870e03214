"""Helpers for tests with real rclpy nodes and node processes."""
import os
import signal
import subprocess
import sys
import time


def spin_until(node, cond, timeout):
    from rclpy.executors import SingleThreadedExecutor
    ex = SingleThreadedExecutor(context=node.context)
    ex.add_node(node)
    end = time.monotonic() + timeout
    try:
        while not cond():  # spins at least once, even with timeout 0
            ex.spin_once(timeout_sec=0.05)
            if time.monotonic() >= end:
                break
    finally:
        ex.remove_node(node)
    return cond()


def wait_for(cond, timeout):
    """Poll ``cond`` (served by an executor in another thread) until true or ``timeout`` s."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and not cond():
        time.sleep(0.05)
    return cond()


def start_node(*args):
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    return subprocess.Popen([sys.executable, '-m', 'mossv_ros.cli', 'run', *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)


def stop(proc, sig=signal.SIGINT, timeout=5.0):
    t0 = time.monotonic()
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=timeout + 5)
    return proc.returncode, time.monotonic() - t0, out


def assistant_in_process(ros_context, checkpoint, **params):
    """The assistant node in this process on our executor (spinning in a thread), with the
    tiny model on the CPU; ``params`` override parameters. :returns: (node, executor)."""
    import threading

    from rclpy.parameter import Parameter

    from mossv_ros.ros.executor import MultiThreadedExecutor
    from mossv_ros.ros.node import AssistantNode
    overrides = {'model.path': str(checkpoint), 'engine.device': 'cpu',
                 'engine.dtype': 'float32', 'sampling.max_new_tokens': 8,
                 'status.period_sec': 0.1, **params}
    node = AssistantNode(context=ros_context, parameter_overrides=[
        Parameter(k, value=v) for k, v in overrides.items()])
    executor = MultiThreadedExecutor(num_threads=4, context=ros_context)
    executor.add_node(node)
    threading.Thread(target=executor.spin, daemon=True).start()
    return node, executor


def teardown_assistant(executor, node, *others):
    executor.shutdown(timeout_sec=1.0)
    node._close_io()
    node._stop_engine()
    for n in (node, *others):
        n.destroy_node()
