"""The executor the node and the demo spin: rclpy's MultiThreadedExecutor with the upstream
fix for its busy re-submission loop, which the Kilted wheels (rclpy 9.x) do not have.

The bug (ros2/rclpy#1452, fixed upstream by ros2/rclpy#1547, released in rclpy 10.0.4): after
``spin_once`` hands a ready callback to the thread pool, the next wait yields the same task
again while it still waits in the pool's queue (it is neither executing nor done), so the spin
thread submits it again and again without ever blocking. That loop holds the GIL, the pool
thread cannot even start the callback, and everything else in the process (the engine's
threads) starves: we measured the node taking about 5 images/s from a 80 images/s stream and
multi-second stalls in the demo. Here a task already in the pool is not submitted again, and
the spin thread gives the GIL away after each hand-off, as upstream does.

A second rclpy 9.x gap (ros2/rclpy#1467, fixed upstream by ros2/rclpy#1469): a coroutine
callback that awaits a ``Future`` completed from another thread is never woken; it is resumed
only if something else happens to wake the wait set, so it can hang for good. Here, while a
coroutine task is left pending after a step, the pool thread wakes the spin thread again after
``RESUME_POLL_S`` so the task is polled until its await completes.
"""
import os
import threading
import time
from typing import Callable, Optional

from rclpy.exceptions import InvalidHandle
from rclpy.executors import (
    ConditionReachedException,
    ExternalShutdownException,
    ShutdownException,
    TimeoutException,
)
from rclpy.executors import MultiThreadedExecutor as RclpyMultiThreadedExecutor

RESUME_POLL_S = 0.002  # s between polls of a coroutine callback that awaits (ros2/rclpy#1467)


class MultiThreadedExecutor(RclpyMultiThreadedExecutor):
    """Drop-in ``rclpy.executors.MultiThreadedExecutor`` (same constructor arguments).

    ``num_handoffs`` counts callbacks handed to the pool (each exactly once).
    """

    def __init__(self, num_threads: Optional[int] = None, **kwargs) -> None:
        super().__init__(num_threads, **kwargs)
        self.num_handoffs = 0
        self._queued = set()  # id() of tasks handed to the pool that no pool thread started yet
        self._queued_lock = threading.Lock()

    def _start(self, handler) -> None:
        """Runs on a pool thread: the task is no longer waiting in the queue."""
        with self._queued_lock:
            self._queued.discard(id(handler))
        handler()
        if not handler.done() and not handler.executing():
            # A coroutine callback is awaiting: nothing will wake the wait set when what it
            # awaits completes (ros2/rclpy#1467), so wake it to poll the task again.
            time.sleep(RESUME_POLL_S)
            guard = self._guard
            if guard is not None:
                try:
                    guard.trigger()
                except InvalidHandle:  # destroyed by a concurrent shutdown: nothing to resume
                    pass

    def _spin_once_impl(self, timeout_sec=None,
                        wait_condition: Callable[[], bool] = lambda: False) -> None:
        try:
            handler, _, _ = self.wait_for_ready_callbacks(timeout_sec, None, wait_condition)
        except (ExternalShutdownException, ShutdownException, TimeoutException,
                ConditionReachedException):
            return
        with self._queued_lock:
            waiting = id(handler) in self._queued
            if not waiting:
                self._queued.add(id(handler))
        if waiting:
            # Still waiting in the pool's queue: do not queue it twice, and let a pool
            # thread take the GIL to start it instead of spinning here. (A coroutine task
            # that awaited something and is yielded again is not waiting: it is resubmitted.)
            time.sleep(0.0005)
            return
        self._executor.submit(self._start, handler)
        self._futures.append(handler)
        self.num_handoffs += 1
        for future in [f for f in self._futures if f.done()]:
            self._futures.remove(future)
            future.result()  # raise any exception from a callback, as rclpy does
        os.sched_yield()  # hand the GIL over so the pool thread can start the callback
