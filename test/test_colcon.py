"""The README's robot route, run as written: ``colcon build`` in a fresh workspace, ``source
install/setup.bash``, ``ros2 launch mossv_ros assistant.launch.py model_path:=... device:=...``.

colcon comes from PyPI (colcon-core, colcon-ros, colcon-cmake), the launch system and ``ros2``
from ../shared/ros2, the ROS 2 core from the venv's wheels (where a distro's setup.bash would
have put it). Skips with the reason where those are missing.
"""
from pathlib import Path
import re
import shutil
import subprocess

import pytest

from .ros2_tools import (
    BIN,
    interrupt,
    kill_group,
    missing_ros2_tools,
    PREFIX,
    processes_mentioning,
    ros2_env,
    start,
    wait_log,
)

ROOT = Path(__file__).resolve().parents[1]
MISSING = missing_ros2_tools() or ('' if (BIN / 'colcon').is_file() else 'colcon not installed')
pytestmark = [pytest.mark.skipif(bool(MISSING), reason=MISSING), pytest.mark.slow,
              pytest.mark.timeout(600)]
#: README lines the test does not run: the variables (it sets its own), the clone (it copies
#: the checkout instead), the pip line (the venv has them), the question (needs a camera).
NOT_RUN = ('MODEL=', 'DEVICE=', 'pip install ', 'mossv-ros ask ')


def readme_robot_block() -> list:
    """The bash block of the README's "On a robot" section, as lines."""
    text = (ROOT / 'README.md').read_text()
    section = text[text.index('## On a robot'):]
    return re.search(r'```bash\n(.*?)```', section, re.S).group(1).splitlines()


def robot_script(home: Path) -> str:
    lines = []
    for line in readme_robot_block():
        if line.startswith(NOT_RUN):
            continue
        if 'git clone' in line:  # `cd ~/ws/src && git clone <repo> mossv_ros && cd ~/ws`
            assert line.endswith('&& cd ~/ws'), line
            line = 'cd ~/ws'
        lines.append(line)
    script = '\n'.join(lines)
    assert 'colcon build --packages-select mossv_ros && source install/setup.bash' in script
    assert 'ros2 launch mossv_ros assistant.launch.py model_path:=$MODEL device:=$DEVICE' \
        in script
    # where the sourced workspace's Python package comes from, printed before the launch
    where = 'python -c "import mossv_ros.msg as m; print(\'mossv_ros.msg from\', m.__file__)"\n'
    return 'set -e\n' + script.replace('ros2 launch', where + 'exec ros2 launch') + '\n'


def copy_checkout(dest: Path) -> None:
    """What ``git clone`` would give: the tracked files of this checkout."""
    files = subprocess.run(['git', 'ls-files', '-z'], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split('\0')
    for name in filter(None, files):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)


def test_readme_robot_route_colcon_build_and_launch(tmp_path):
    from mossv_ros.toyworld import shipped_model_dir
    home = tmp_path / 'home'
    copy_checkout(home / 'ws' / 'src' / 'mossv_ros')
    script = tmp_path / 'robot.sh'
    script.write_text(robot_script(home))
    # a shell with the venv active, as `source /opt/ros/<distro>/setup.bash` would give
    env = ros2_env(HOME=str(home), VIRTUAL_ENV=str(PREFIX), MODEL=str(shipped_model_dir()),
                   DEVICE='cpu', CMAKE_PREFIX_PATH=str(PREFIX))
    log = tmp_path / 'robot.log'
    proc = start(['bash', str(script)], env=env, log=log)
    try:
        out = wait_log(log, 'model ready', 480, proc)
        install = home / 'ws' / 'install' / 'mossv_ros'
        assert (install / 'lib' / 'mossv_ros' / 'assistant_node').is_file(), out
        assert 'float32 on cpu' in out, out
        # the launched node runs the workspace's install, not the checkout's editable copy
        assert f'mossv_ros.msg from {install}/lib/python' in out, out
        node = [cmd for _, cmd in processes_mentioning('assistant_node') if str(home) in cmd]
        assert node and str(install / 'lib' / 'mossv_ros' / 'assistant_node') in node[0], node
        code, took = interrupt(proc, timeout=10)
    finally:
        kill_group(proc)
    out = log.read_text()
    assert code == 0, f'rc {code}, {took:.1f} s\n{out[-3000:]}'  # (time: bench_shutdown)
    assert 'Finished <<< mossv_ros' in out, out[-3000:]
