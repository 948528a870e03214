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


#: the house rules of the split by job (README Design): ROS modules as glue, engine classes
#: a newcomer can read, ROS callbacks that hand work on
MAX_ROS_FILE_LINES, MAX_ENGINE_CLASS_LINES, MAX_CALLBACK_LINES = 300, 300, 25
_CREATE = ('create_subscription', 'create_timer', 'create_service', 'create_guard_condition',
           'ActionServer')


def callbacks(tree: ast.Module) -> list:
    """Functions of a ROS module that rclpy calls: lifecycle transitions and handlers
    (``on_*``, ``_on_*``), the decorated ones (``never_raises``, ``logged_transition``) and
    every ``self.<method>`` handed to a ``create_*`` call or an ActionServer."""
    handed = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, 'attr',
                                                  getattr(node.func, 'id', None)) in _CREATE:
            for arg in list(node.args) + [k.value for k in node.keywords]:
                if isinstance(arg, ast.Attribute) and isinstance(arg.value, ast.Name):
                    handed.add(arg.attr)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            decorated = {getattr(d, 'id', '') for d in node.decorator_list}
            if (node.name.startswith(('on_', '_on_')) or node.name in handed
                    or decorated & {'never_raises', 'logged_transition'}):
                out.append(node)
    return out


def test_house_sizes():
    ros = ROOT / 'mossv_ros' / 'ros'
    long_files = [(p.name, n) for p in ros.glob('*.py')
                  if (n := len(p.read_text().splitlines())) > MAX_ROS_FILE_LINES]
    long_classes = [(p.name, c.name, c.end_lineno - c.lineno + 1) for p in ENGINE.glob('*.py')
                    for c in ast.walk(ast.parse(p.read_text()))
                    if isinstance(c, ast.ClassDef)
                    and c.end_lineno - c.lineno + 1 > MAX_ENGINE_CLASS_LINES]
    found = [(p.name, f.name, f.end_lineno - f.lineno + 1) for p in ros.glob('*.py')
             for f in callbacks(ast.parse(p.read_text()))]
    assert len(found) >= 15  # the rule finds the node's callbacks
    long_callbacks = [c for c in found if c[2] > MAX_CALLBACK_LINES]
    assert (long_files, long_classes, long_callbacks) == ([], [], [])


def test_callback_finder_sees_handed_methods():
    tree = ast.parse('class N:\n    def __init__(self):\n'
                     '        self.create_timer(1.0, self.tick)\n'
                     '    def tick(self):\n        pass\n    def helper(self):\n        pass\n')
    assert [f.name for f in callbacks(tree)] == ['tick']
