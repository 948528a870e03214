"""What the node says about itself is true (issue 26 items 4-7): the reason no frame arrives
follows the ROS graph as publishers come and go, a warning goes when its cause does, the
per-camera figures of /diagnostics are each camera's, and an inactive node reads inactive in
Status and /diagnostics (OK, not an error)."""
import time

import numpy as np
import pytest

from .ros_helpers import assistant_in_process, spin_until, teardown_assistant, wait_for

rclpy = pytest.importorskip('rclpy')
pytestmark = [pytest.mark.ros, pytest.mark.timeout(300)]
NODE = '/mossv_assistant'


def _frame(stamp_sec: int, value: int = 0):
    from sensor_msgs.msg import Image
    msg = Image(height=24, width=32, encoding='rgb8', step=96,
                data=np.full((24, 32, 3), value, np.uint8).tobytes())
    msg.header.stamp.sec, msg.header.frame_id = stamp_sec, 'cam'
    return msg


def _publisher_process(msg_type: str, topic: str):
    """A process that holds a ``sensor_msgs/<msg_type>`` publisher on ``topic`` until
    SIGINT."""
    import os
    import subprocess
    import sys
    code = (f'import rclpy, signal; from sensor_msgs.msg import {msg_type}; rclpy.init(); '
            f'n = rclpy.create_node("wrong_camera"); n.create_publisher({msg_type}, '
            f'"{topic}", 10); print("up", flush=True)\n'
            'try:\n    rclpy.spin(n)\nexcept (KeyboardInterrupt, '
            'rclpy.executors.ExternalShutdownException):\n    pass\n'
            'n.destroy_node(); rclpy.try_shutdown()')
    proc = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ),
                            start_new_session=True)
    assert proc.stdout.readline().strip() == 'up'
    return proc


def _probe(ros_context):
    from diagnostic_msgs.msg import DiagnosticArray

    from mossv_ros.msg import Status
    probe = rclpy.create_node('status_probe', context=ros_context)
    got = {'status': [], 'diagnostics': []}
    probe.create_subscription(Status, f'{NODE}/status', got['status'].append, 100)
    probe.create_subscription(DiagnosticArray, '/diagnostics', got['diagnostics'].append, 100)
    return probe, got


def _part(got, name):
    """The newest DiagnosticStatus called '<node>: <name>' (None before one came)."""
    for array in reversed(got['diagnostics']):
        for st in array.status:
            if st.name == f'mossv_assistant: {name}':
                return st, {kv.key: kv.value for kv in st.values}
    return None, {}


def test_a_wrong_publisher_that_appears_later_is_named_and_the_warning_follows(ros_context,
                                                                              tiny_checkpoint):
    """Node first, then a publisher of the wrong type (the usual order): it is named in
    Status.warning within seconds; when it goes, that warning goes; when frames come, every
    'no image' warning goes (before: one check 5 s after activation, and the generic warning
    stayed 30 s after frames arrived)."""
    from rclpy.lifecycle import TransitionCallbackReturn
    from sensor_msgs.msg import Image

    from .ros_helpers import stop
    node, executor = assistant_in_process(ros_context, tiny_checkpoint,
                                          **{'topics.images': ['/cam_x'],
                                             'qos.image_reliability': 'reliable'})
    probe, got = _probe(ros_context)
    try:
        ok = TransitionCallbackReturn.SUCCESS
        assert node.trigger_configure() == ok and node.trigger_activate() == ok
        assert spin_until(probe, lambda: got['status'] and 'since activation on /cam_x'
                          in got['status'][-1].warning, 15), got['status'][-1:]
        wrong = _publisher_process('CompressedImage', '/cam_x')  # another process: DDS
        t0 = time.monotonic()  # refuses two types of one topic in one participant
        named = 'published as sensor_msgs/msg/CompressedImage'
        assert spin_until(probe, lambda: named in got['status'][-1].warning, 10), \
            got['status'][-1].warning
        assert time.monotonic() - t0 < 6.0
        assert 'topics.transport:=compressed' in got['status'][-1].warning
        stop(wrong)
        assert spin_until(probe, lambda: named not in got['status'][-1].warning, 10)
        camera = probe.create_publisher(Image, '/cam_x', 10)
        assert spin_until(probe, lambda: camera.get_subscription_count() > 0, 10)
        for i in range(3):
            camera.publish(_frame(100 + i))
            spin_until(probe, lambda: False, 0.3)
        assert spin_until(probe, lambda: got['status'][-1].warning == '', 10), \
            got['status'][-1].warning
    finally:
        teardown_assistant(executor, node, probe)


def test_per_camera_diagnostics_are_each_cameras(ros_context, tiny_checkpoint):
    """Two cameras: each /diagnostics camera entry carries its own camera's frames, cache and
    drops, the same figures as Status.cameras (before: node-wide totals in each)."""
    from rclpy.lifecycle import TransitionCallbackReturn

    from mossv_ros.ros import convert
    node, executor = assistant_in_process(ros_context, tiny_checkpoint,
                                          **{'cameras.names': ['a', 'b'],
                                             'cameras.topics': ['/cam_a', '/cam_b'],
                                             'diagnostics.period_sec': 0.2})
    probe, got = _probe(ros_context)
    try:
        ok = TransitionCallbackReturn.SUCCESS
        assert node.trigger_configure() == ok and node.trigger_activate() == ok
        for i in range(5):
            node.ingest.on_image(_frame(100 + i, 10 * i), convert.image_to_rgb, '/cam_a', 'a')
            if i < 2:
                node.ingest.on_image(_frame(100 + i, 20 * i), convert.image_to_rgb, '/cam_b',
                                     'b')
            assert node.engine.wait_idle(30)

        def figures():
            _, a = _part(got, 'camera /cam_a')
            _, b = _part(got, 'camera /cam_b')
            return a.get('num_frames_cached') == '5' and b.get('num_frames_cached') == '2'
        assert spin_until(probe, figures, 10), (_part(got, 'camera /cam_a'),
                                                 _part(got, 'camera /cam_b'))
        _, a = _part(got, 'camera /cam_a')
        _, b = _part(got, 'camera /cam_b')
        assert (a['camera'], b['camera']) == ('a', 'b')
        assert (a['num_frames_received'], b['num_frames_received']) == ('5', '2')
        assert (a['num_images'], b['num_images']) == ('5', '2')
        assert int(a['cache_bytes']) > int(b['cache_bytes']) > 0
        def counted():  # the newest Status that reports the cameras (a Status sent while
            # the node was still coming up reports none)
            status = next((st for st in reversed(got['status']) if st.cameras), None)
            cams = {c.name: c.num_frames_received for c in status.cameras} if status else {}
            return cams == {'a': 5, 'b': 2}
        assert spin_until(probe, counted, 10), [[(c.name, c.num_frames_received)
                                                 for c in st.cameras] for st in got['status'][-3:]]
    finally:
        teardown_assistant(executor, node, probe)


def test_an_inactive_node_reads_inactive_and_warns(ros_context, tiny_checkpoint):
    """Configured, not active: Status says INACTIVE (lifecycle 'inactive') and /diagnostics
    says so at level WARN (issue 36 item 6: at OK a monitor reading levels showed green while
    every question was refused), not ERROR; active again: READY and OK."""
    from diagnostic_msgs.msg import DiagnosticStatus
    from rclpy.lifecycle import TransitionCallbackReturn

    from mossv_ros.msg import Status
    node, executor = assistant_in_process(ros_context, tiny_checkpoint,
                                          **{'diagnostics.period_sec': 0.2})
    probe, got = _probe(ros_context)
    try:
        ok = TransitionCallbackReturn.SUCCESS
        assert node.trigger_configure() == ok
        assert spin_until(probe, lambda: got['status'] and got['status'][-1].state
                          == Status.STATE_INACTIVE, 10)
        last = got['status'][-1]
        assert last.state_text == 'inactive' and last.lifecycle_state == 'inactive'
        assert not node.intake.submit('anyone?', 'q')[0]

        def engine_says(state, level):
            st, values = _part(got, 'engine')
            return st is not None and values['state'] == state and st.level == level
        assert spin_until(probe, lambda: engine_says('inactive', DiagnosticStatus.WARN), 10)
        assert 'inactive' in _part(got, 'engine')[0].message
        assert node.trigger_activate() == ok
        assert spin_until(probe, lambda: got['status'][-1].state == Status.STATE_READY, 10)
        assert got['status'][-1].lifecycle_state == 'active'
        assert spin_until(probe, lambda: engine_says('ready', DiagnosticStatus.OK), 10)
    finally:
        teardown_assistant(executor, node, probe)


def test_quantization_is_refused_or_reported(ros_context, tiny_checkpoint):
    """Issue 27: a mode that cannot run here (int4 on the CPU) fails configure with the reason
    and leaves the node unconfigured and answering; int8 loads, and Status and /diagnostics
    report the quantization and the weights' bytes (less than the float model's)."""
    pytest.importorskip('torchao')
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter

    from mossv_ros.msg import Status
    node, executor = assistant_in_process(ros_context, tiny_checkpoint,
                                          **{'model.quantization': 'int4',
                                             'diagnostics.period_sec': 0.2})
    probe, got = _probe(ros_context)
    try:
        assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
        assert node.lifecycle_state() == 'unconfigured' and node.engine is None
        assert not node.intake.submit('anyone?', 'q')[0]
        plain = {}
        for mode in ('none', 'int8'):
            node.set_parameters([Parameter('model.quantization', value=mode)])
            assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
            assert spin_until(probe, lambda: got['status'] and got['status'][-1].quantization
                              == mode, 10)
            plain[mode] = got['status'][-1].weight_bytes
            assert spin_until(probe, lambda: _part(got, 'model')[1].get('quantization')
                              == mode, 10)
            assert node.trigger_cleanup() == TransitionCallbackReturn.SUCCESS
        assert 0 < plain['int8'] < plain['none']
        assert got['status'][-1].state in (Status.STATE_UNLOADED, Status.STATE_INACTIVE)
    finally:
        teardown_assistant(executor, node, probe)


def test_a_configuration_that_does_not_fit_says_why_and_what_would(ros_context,
                                                                    tiny_checkpoint):
    """Issue 33: the memory plan refuses a configuration before any weight is read; the node
    stays alive and unconfigured, every request, Status and /diagnostics say why and what would
    fit; after ``ros2 param set`` of a suggestion, configure succeeds and Status carries the
    planned, measured and available bytes."""
    from diagnostic_msgs.msg import DiagnosticStatus
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter

    node, executor = assistant_in_process(ros_context, tiny_checkpoint, **{
        'engine.max_device_memory_bytes': 1 << 26, 'cache.max_frames': 8000,
        'diagnostics.period_sec': 0.2})
    probe, got = _probe(ros_context)
    try:
        assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
        assert node.lifecycle_state() == 'unconfigured' and node.engine is None
        ok, _, why = node.intake.submit('anyone?', 'q')
        assert not ok and 'does not fit in memory' in why and 'cache.max_frames:=' in why, why
        assert spin_until(probe, lambda: 'does not fit' in (
            got['status'][-1].last_error if got['status'] else ''), 10)
        assert spin_until(probe, lambda: _part(got, 'model')[0] is not None and _part(
            got, 'model')[0].level == DiagnosticStatus.ERROR, 10)
        fix = next(f for f in why.split(' | ') + why.split('; would fit: ')
                   if f.startswith('cache.max_frames:='))
        frames = int(fix.split(':=')[1].split()[0].rstrip(')'))
        node.set_parameters([Parameter('cache.max_frames', value=frames)])
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert node.configure_error == ''
        assert spin_until(probe, lambda: got['status'] and got['status'][-1].state_text
                          == 'inactive', 10)
        status = got['status'][-1]
        assert status.available_memory_bytes == 1 << 26
        assert 0 < status.measured_memory_bytes <= status.planned_memory_bytes <= 1 << 26
    finally:
        teardown_assistant(executor, node, probe)


def test_cleanup_and_reconfigure_free_the_model_without_the_collector(ros_context,
                                                                       tiny_checkpoint):
    """Issue 33: with the garbage collector off, the model, its caches and graphs die at
    cleanup, and a reconfigure that changes a parameter frees the old model before it loads
    the new one (a GPU never holds two models)."""
    import gc
    import weakref

    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter
    ok = TransitionCallbackReturn.SUCCESS
    node, executor = assistant_in_process(ros_context, tiny_checkpoint)
    gc.collect()
    gc.disable()
    try:
        for cycle in range(3):
            assert node.trigger_configure() == ok
            model = weakref.ref(node.engine.runner.model)
            pool = weakref.ref(node.engine.session.pool)
            assert node.trigger_cleanup() == ok
            assert model() is None and pool() is None, f'cycle {cycle}'
        # an engine failure while active leaves the node unconfigured with its engine kept
        # (configure restarts it without a reload); a parameter changed then means a new
        # model: the old one must be gone before the new one is read
        from mossv_ros.engine.events import ErrorEvent
        assert node.trigger_configure() == ok and node.trigger_activate() == ok
        old = weakref.ref(node.engine.runner.model)
        node.engine.emit(ErrorEvent('injected failure', fatal=True))
        assert wait_for(lambda: node.lifecycle_state() == 'unconfigured', 10)
        assert old() is not None
        seen = []
        from mossv_ros.engine import runner as runner_module
        load = runner_module.load_hf_model

        def spy(*args, **kwargs):
            seen.append(old() is None)  # the old model is gone before a weight is read
            return load(*args, **kwargs)
        runner_module.load_hf_model = spy
        try:
            node.set_parameters([Parameter('cache.max_frames', value=12)])
            assert node.trigger_configure() == ok
        finally:
            runner_module.load_hf_model = load
        assert seen == [True] and old() is None
        assert node.engine.runner.config.max_frames == 12
    finally:
        gc.enable()
        teardown_assistant(executor, node)
