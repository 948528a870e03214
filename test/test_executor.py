"""The node's executor (mossv_ros.ros.executor): rclpy's MultiThreadedExecutor without the
busy re-submission loop of ros2/rclpy#1452 and with awaiting coroutine callbacks resumed
(ros2/rclpy#1467)."""
import threading
import time

import pytest

rclpy = pytest.importorskip('rclpy')
pytestmark = pytest.mark.ros

NUM_MESSAGES = 300


def _run(ros_context, executor, work_s):
    """Publish NUM_MESSAGES to a subscription whose callback holds the GIL for ``work_s``
    (like a frame conversion); return the callbacks run and the submissions to the pool."""
    from std_msgs.msg import Int32
    node = rclpy.create_node('executor_test', context=ros_context)
    got, submitted = [], []
    lock = threading.Lock()

    def on_msg(msg):
        end = time.perf_counter() + work_s
        while time.perf_counter() < end:
            pass
        with lock:
            got.append(msg.data)

    node.create_subscription(Int32, 'executor_test', on_msg, NUM_MESSAGES)
    pub = node.create_publisher(Int32, 'executor_test', NUM_MESSAGES)
    pool_submit = executor._executor.submit

    def counting_submit(fn, *args, **kwargs):
        submitted.append(args[0] if args else fn)  # the rclpy task, however it is wrapped
        return pool_submit(fn, *args, **kwargs)

    executor._executor.submit = counting_submit
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        for i in range(NUM_MESSAGES):
            pub.publish(Int32(data=i))
        end = time.monotonic() + 60
        while len(got) < NUM_MESSAGES and time.monotonic() < end:
            time.sleep(0.05)
    finally:
        executor.shutdown(timeout_sec=2.0)
        spinner.join(timeout=5.0)
        node.destroy_node()
    return got, submitted


def test_every_callback_is_handed_to_the_pool_once(ros_context):
    from mossv_ros.ros.executor import MultiThreadedExecutor
    executor = MultiThreadedExecutor(num_threads=4, context=ros_context)
    got, submitted = _run(ros_context, executor, work_s=0.001)
    assert sorted(got) == list(range(NUM_MESSAGES))  # nothing lost, nothing run twice
    # one submission per callback: no task queued again while it waited for a pool thread
    assert len(submitted) == len(got) == executor.num_handoffs
    assert len({id(task) for task in submitted}) == len(submitted)


def test_async_callback_resumes_after_its_await(ros_context):
    """A coroutine callback that awaits a future completed from another thread resumes: in
    rclpy 9.x nothing wakes the executor for it (ros2/rclpy#1467), which hung about one run in
    five before the executor polled awaiting tasks. Five awaits per run make a regression show."""
    from rclpy.task import Future
    from std_msgs.msg import Int32

    from mossv_ros.ros.executor import MultiThreadedExecutor
    node = rclpy.create_node('executor_async_test', context=ros_context)
    gates = [Future() for _ in range(5)]
    started, done = threading.Semaphore(0), []

    async def on_msg(msg):
        started.release()
        await gates[msg.data]
        done.append(msg.data)

    node.create_subscription(Int32, 'executor_async_test', on_msg, 10)
    pub = node.create_publisher(Int32, 'executor_async_test', 10)
    executor = MultiThreadedExecutor(num_threads=2, context=ros_context)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        for i, gate in enumerate(gates):
            pub.publish(Int32(data=i))
            assert started.acquire(timeout=10.0)
            assert done == list(range(i))  # still awaiting its gate
            gate.set_result(True)
            end = time.monotonic() + 10.0
            while len(done) <= i and time.monotonic() < end:
                time.sleep(0.01)
            assert done == list(range(i + 1))
    finally:
        executor.shutdown(timeout_sec=2.0)
        spinner.join(timeout=5.0)
        node.destroy_node()
