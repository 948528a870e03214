"""Helpers for the tests that run the real ROS 2 tools: ``ros2 launch``, the ``ros2`` CLI,
launch_pytest and colcon (installed from ../shared/ros2 by scripts/setup_env.sh).

Every wait is bounded; every process started here is stopped by the test that started it.
"""
import os
from pathlib import Path
import signal
import subprocess
import sys
import time
from typing import Optional

BIN = Path(sys.executable).parent
PREFIX = Path(sys.prefix)


def missing_ros2_tools(prefix: Optional[Path] = None) -> str:
    """Why the launch / CLI tests cannot run here ('' if they can).

    Checks the launch packages and the ``ros2`` command import, and that the package's
    executable is installed where ``launch_ros`` and ``ros2 run`` look for it
    (``<prefix>/lib/mossv_ros/assistant_node``, prefix from the ament index): without it
    ``ros2 launch`` fails and a launch test would wait for a node that never starts.
    """
    import importlib.util
    for module in ('launch_pytest', 'launch_ros', 'ros2cli', 'ros2launch',
                   'composition_interfaces'):
        if importlib.util.find_spec(module) is None:
            return (f'{module} is not installed (the ROS 2 launch system and ros2 CLI come '
                    'from ../shared/ros2: scripts/setup_env.sh installs them when it exists)')
    if not (BIN / 'ros2').is_file():
        return f'no ros2 command in {BIN}'
    prefix = prefix or PREFIX
    index = prefix / 'share' / 'ament_index' / 'resource_index' / 'packages' / 'mossv_ros'
    if not index.is_file():
        return f'mossv_ros is not in the ament index of {prefix} (run scripts/setup_env.sh)'
    exe = prefix / 'lib' / 'mossv_ros' / 'assistant_node'
    if not os.access(exe, os.X_OK):
        return f'{exe} is not installed (ros2 launch / ros2 run would not find the node)'
    return ''


def ros2_env(**extra) -> dict:
    """The environment a user's shell has after activating the venv: the venv's ament
    prefix, unbuffered Python output; ROS_DOMAIN_ID and the discovery range come from
    conftest (this run's DDS traffic stays to itself)."""
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    env['AMENT_PREFIX_PATH'] = os.pathsep.join(
        p for p in [str(PREFIX), env.get('AMENT_PREFIX_PATH', '')] if p)
    env['PATH'] = os.pathsep.join([str(BIN), env.get('PATH', '')])
    env.update(extra)
    return env


#: verbs that can work without the ros2 daemon: the tests never start one (a daemon left
#: running, or one of another distro on the same domain id, hung a Jazzy CI run for 60 s)
NO_DAEMON_VERBS = {('param', 'get'), ('param', 'set'), ('lifecycle', 'get'),
                   ('lifecycle', 'set'), ('topic', 'echo'), ('topic', 'list'), ('node', 'list')}


def ros2(*args, timeout: float = 60.0, env: Optional[dict] = None,
         check: bool = True) -> subprocess.CompletedProcess:
    """Run ``ros2 ARGS`` to completion (stdout and stderr together in ``.stdout``), with
    ``--no-daemon --spin-time 3`` where the verb takes them."""
    if tuple(args[:2]) in NO_DAEMON_VERBS:  # discovery within the call: a few seconds
        args = (*args[:2], '--no-daemon', '--spin-time', '3', *args[2:])
    proc = subprocess.run([str(BIN / 'ros2'), *args], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout,
                          env=env or ros2_env())
    if check and proc.returncode != 0:
        raise AssertionError(f'ros2 {" ".join(args)} exited {proc.returncode}:\n{proc.stdout}')
    return proc


#: the longest one ``ros2`` call may take before the tests call it hung (discovery within the
#: call takes ``--spin-time`` 3 s; the node answers a request in well under a second)
CALL_BOUND_SEC = 20.0


def ros2_retry(*args, until, timeout: float = 60.0, env: Optional[dict] = None) -> str:
    """Run ``ros2 ARGS`` until ``until(output)`` holds (discovery takes a few seconds), each
    call bounded by :data:`CALL_BOUND_SEC`. For idempotent verbs (get, echo, param set, a
    service call whose repetition is harmless): a call that hangs is run again.

    Why a call hangs, found under load (a core kept busy, the ROS tests run three times): the
    ros2 CLI waits without a timeout for the service to be ready and then for the response,
    and with Fast DDS a request can be answered before the server has matched the client's
    response reader, so the response is never delivered: the CLI's own discovery, not the
    node (whose service answers an rclpy client at once meanwhile, see
    :func:`ros2_transition`)."""
    end = time.monotonic() + timeout
    out = ''
    while time.monotonic() < end:
        try:  # one hung call must not eat the whole budget
            proc = ros2(*args, timeout=max(5.0, min(CALL_BOUND_SEC, end - time.monotonic())),
                        env=env, check=False)
        except subprocess.TimeoutExpired as exc:
            out = f'timed out: {exc}'
            continue
        out = proc.stdout
        if until(out):
            return out
        time.sleep(0.5)
    raise AssertionError(f'ros2 {" ".join(args)} never gave the expected output:\n{out}')


def lifecycle_state(node_name: str, context, timeout: float = 10.0) -> Optional[str]:
    """The node's lifecycle state label through an rclpy client of the test (bounded); None
    when the node's get_state service does not answer within ``timeout``."""
    from lifecycle_msgs.srv import GetState
    import rclpy

    from .ros_helpers import spin_until
    probe = rclpy.create_node('lifecycle_probe', context=context)
    try:
        client = probe.create_client(GetState, f'{node_name}/get_state')
        if not client.wait_for_service(timeout_sec=timeout):
            return None
        future = client.call_async(GetState.Request())
        if not spin_until(probe, future.done, timeout):
            return None
        return future.result().current_state.label
    finally:
        probe.destroy_node()


def ros2_transition(node_name: str, transition: str, target: str, context,
                    attempts: int = 3) -> str:
    """``ros2 lifecycle set NODE TRANSITION`` until the node is in state ``target``.

    A transition is not idempotent, so a call that hangs past :data:`CALL_BOUND_SEC` is
    diagnosed with the test's own client before anything is retried: the node in ``target``
    means it made the transition and answered, and the CLI lost the response (its own
    discovery, see :func:`ros2_retry`): done; the node still in the old state, answering
    get_state: the request never reached it, so it is sent again; the node not answering
    get_state at all is a node defect, and the test fails saying so.
    :returns: the CLI's output, or what the diagnosis found."""
    notes = []
    for _ in range(attempts):
        try:
            out = ros2('lifecycle', 'set', node_name, transition, timeout=CALL_BOUND_SEC,
                       check=False).stdout
            if 'Transitioning successful' in out:
                return out
            notes.append(out)
        except subprocess.TimeoutExpired:
            notes.append(f'ros2 lifecycle set {transition}: no response in {CALL_BOUND_SEC} s')
        state = lifecycle_state(node_name, context)
        if state is None:
            raise AssertionError(f'{node_name} does not answer get_state: a node defect\n'
                                 + '\n'.join(notes))
        if state == target:
            return f'{notes[-1]}\n(the node is {state}: the CLI lost the response)'
    raise AssertionError(f'{node_name} never reached {target}:\n' + '\n'.join(notes))


def start(cmd, env: Optional[dict] = None, log: Optional[Path] = None) -> subprocess.Popen:
    """Start a long-running command in its own session, output into ``log``, in the log's
    folder (not the checkout, whose ``mossv_ros/`` any ``python3`` would import)."""
    out = open(log, 'w') if log else subprocess.DEVNULL
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True,
                            env=env or ros2_env(), start_new_session=True,
                            cwd=log.parent if log else '/')


def interrupt(proc: subprocess.Popen, timeout: float) -> tuple:
    """SIGINT to the process group, as Ctrl-C in a terminal does (``ros2 run`` relies on it:
    it does not forward the signal); :returns: (exit code or None if still running, seconds).
    """
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None, time.monotonic() - t0
    return proc.returncode, time.monotonic() - t0


def kill_group(proc: subprocess.Popen) -> None:
    """Last resort in a test's cleanup: kill the whole process group."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


def processes_mentioning(text: str) -> list:
    """Live processes whose command line contains ``text`` (psutil)."""
    import psutil
    found = []
    for p in psutil.process_iter(['pid', 'cmdline']):
        try:
            if any(text in part for part in (p.info['cmdline'] or [])):
                found.append((p.info['pid'], ' '.join(p.info['cmdline'])))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def wait_log(log: Path, text: str, timeout: float, proc=None) -> str:
    """Wait until ``text`` appears in the log file; :returns: the log."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        content = log.read_text() if log.exists() else ''
        if text in content:
            return content
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.2)
    content = log.read_text() if log.exists() else ''
    raise AssertionError(f'{text!r} not in the output within {timeout} s:\n{content[-4000:]}')
