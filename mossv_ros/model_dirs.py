"""Where the models that ship with or are made by the package live (no torch, no rclpy
imported here): below the CLI and the demo, which both use them."""
import os
from pathlib import Path

DEFAULT_TINY_DIR = Path(os.environ.get('MOSSV_ROS_CACHE', Path.home() / '.cache' / 'mossv_ros'))


def default_model_dir() -> Path:
    """The embedded default model: the toyworld checkpoint shipped in the package (a tiny
    MOSS-architecture model trained by ``mossv-ros toyworld train``)."""
    from .toyworld import shipped_model_dir
    return shipped_model_dir()


def random_tiny_model_dir() -> Path:
    """A tiny random checkpoint of the MOSS architecture, written on first use (seeded,
    deterministic): plumbing only, for real videos (``demo --video``)."""
    from .engine.tiny import write_tiny_checkpoint
    path = DEFAULT_TINY_DIR / 'tiny-random-seed0'
    if not (path / 'model.safetensors').is_file():
        write_tiny_checkpoint(path, seed=0)
    return path
