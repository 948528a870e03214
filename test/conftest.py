"""Shared fixtures: a tiny checkpoint written by the project's own code, ROS isolation."""
import os
from pathlib import Path
import random
import sys

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / 'shared'

# Keep this run's DDS traffic to itself (parallel runs, other machines' nodes).
os.environ.setdefault('ROS_DOMAIN_ID', str(random.randint(1, 100)))
os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
# What activating the venv sets (scripts/setup_env.sh): the ament index of the venv prefix,
# where `ros2 launch` and launch_ros find the package, its share files and executables.
if sys.prefix not in os.environ.get('AMENT_PREFIX_PATH', '').split(os.pathsep):
    os.environ['AMENT_PREFIX_PATH'] = os.pathsep.join(
        p for p in (sys.prefix, os.environ.get('AMENT_PREFIX_PATH', '')) if p)


@pytest.fixture(scope='session')
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The docs/model.md section 9 tiny model in the published MOSS layout."""
    from mossv_ros.engine.tiny import write_tiny_checkpoint
    return write_tiny_checkpoint(tmp_path_factory.mktemp('tiny') / 'moss', seed=0)


@pytest.fixture(scope='session')
def tiny_runner(tiny_checkpoint):
    from mossv_ros.engine.config import EngineConfig
    from mossv_ros.engine.runner import ModelRunner
    return ModelRunner(EngineConfig(model_path=str(tiny_checkpoint), max_frames=8,
                                    max_context_tokens=2048))


def shared_videos():
    return sorted((SHARED / 'data' / 'videos').glob('*.mp4'))


@pytest.fixture
def ros_context():
    """An rclpy context of its own (pass ``context=`` to nodes and executors)."""
    rclpy = pytest.importorskip('rclpy')
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    yield ctx
    rclpy.try_shutdown(context=ctx)
