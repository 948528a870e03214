"""Layering (the engine is ROS-free) and lint (ament_flake8-equivalent ruff settings)."""
import ast
from pathlib import Path
import subprocess
import sys

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / 'mossv_ros' / 'engine'
PURE = ('config.py', 'events.py', 'prompt.py', 'policy.py', '__init__.py')


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                yield node.module
            elif node.level >= 2:  # from ..x import y -> leaves the engine package
                yield f'mossv_ros.{node.module or ""}'


def test_engine_never_imports_ros():
    files = sorted(ENGINE.glob('*.py'))
    assert len(files) >= 8
    offenders = [(f.name, m) for f in files for m in _imports(f)
                 if m.split('.')[0] in ('rclpy', 'sensor_msgs', 'std_msgs', 'builtin_interfaces')
                 or m.startswith(('mossv_ros.msg', 'mossv_ros.srv', 'mossv_ros.ros'))]
    assert offenders == []


def test_pure_engine_modules_import_neither_torch_nor_rclpy():
    for name in PURE:
        mods = {m.split('.')[0] for m in _imports(ENGINE / name)}
        assert not mods & {'torch', 'transformers', 'rclpy'}, (name, mods)


def test_layering_check_detects_a_violation(tmp_path):
    bad = tmp_path / 'bad.py'
    bad.write_text('import rclpy\nfrom mossv_ros.msg import Token\n')
    assert list(_imports(bad)) == ['rclpy', 'mossv_ros.msg']


def test_ruff_lint_clean():
    result = subprocess.run([sys.executable, '-m', 'ruff', 'check', str(ROOT)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
