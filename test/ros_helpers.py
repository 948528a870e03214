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
