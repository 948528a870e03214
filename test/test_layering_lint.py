"""Layering (the engine is ROS-free) and lint (ament_flake8-equivalent ruff settings)."""
import ast
from pathlib import Path
import subprocess
import sys

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / 'mossv_ros' / 'engine'
PURE = ('config.py', 'events.py', 'prompt.py', 'policy.py', 'dialogue.py', 'inbox.py',
        '__init__.py')


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


def test_dialogue_and_inbox_load_without_torch():
    code = ('import sys; import mossv_ros.engine.dialogue, mossv_ros.engine.inbox; '
            'print(sorted(m for m in ("torch", "transformers", "rclpy", "numpy") '
            'if m in sys.modules))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    assert out.strip() == '[]'


def module_graph(package: Path) -> dict:
    """{module: set of package modules it imports}, function-level imports included, relative
    imports resolved (``from . import x`` names the module ``x`` when it is one)."""
    root = package.parent
    names = {'.'.join(p.relative_to(root).with_suffix('').parts).removesuffix('.__init__'): p
             for p in package.rglob('*.py')}
    graph = {}
    for name, path in names.items():
        pkg = name if path.name == '__init__.py' else name.rpartition('.')[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ''
                if node.level:
                    parts = pkg.split('.')
                    parts = parts[:len(parts) - node.level + 1]
                    base = '.'.join(parts + ([base] if base else []))
                targets = [base] + [f'{base}.{a.name}' for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in names and t != name}
        graph[name] = deps
    return graph


def import_cycles(graph: dict) -> list:
    """Every strongly connected set of modules larger than one (Tarjan), sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_no_import_circles():
    graph = module_graph(ROOT / 'mossv_ros')
    assert len(graph) > 30 and 'mossv_ros.engine.engine' in graph['mossv_ros.ros.node']
    # (package __init__ modules re-export their children: a parent -> child edge is fine)
    for name, deps in graph.items():
        graph[name] = {d for d in deps if not name.startswith(d + '.') and
                       not d.startswith(name + '.')}
    assert import_cycles(graph) == []


def test_import_cycle_check_finds_a_circle():
    graph = {'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}
    assert import_cycles(graph) == [['a', 'b', 'c']]


def test_layering_check_detects_a_violation(tmp_path):
    bad = tmp_path / 'bad.py'
    bad.write_text('import rclpy\nfrom mossv_ros.msg import Token\n')
    assert list(_imports(bad)) == ['rclpy', 'mossv_ros.msg']


def test_ruff_lint_clean():
    result = subprocess.run([sys.executable, '-m', 'ruff', 'check', str(ROOT)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
