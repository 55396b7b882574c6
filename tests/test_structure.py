"""The package's shape: no import cycle inside vcr1 (imports inside functions included), config.py a leaf,
and no task named outside vcr1/tasks (the trainer, data, evaluation and logging are task-agnostic)."""
import ast
import re
from pathlib import Path

from vcr1_testing import REPO

PACKAGE = REPO / "vcr1"
BUILTIN_TASKS = ("tg", "tracking", "gqa", "mcq")


def module_name(path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path, modules: set) -> set:
    """The vcr1 modules `path` imports anywhere in its code (module level, functions, methods)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from vcr1 import rewards`
    return {name for name in found if name in modules}


def import_graph() -> dict:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports(path, set(files)) - {name} for name, path in files.items()}


def find_cycle(graph: dict):
    """One import cycle as a list of modules, or None (depth-first search, colouring the nodes)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_import_walker_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\n\ndef f():\n    from vcr1 import rewards\n    import vcr1.tasks.base\n")
    assert imports(source, {"vcr1.rewards", "vcr1.tasks.base", "vcr1.tasks"}) == {"vcr1.rewards", "vcr1.tasks.base"}


def test_no_import_cycle_inside_vcr1():
    graph = import_graph()
    assert "vcr1.train" in graph and "vcr1.tasks.base" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_config_is_a_leaf():
    tree = ast.parse((PACKAGE / "config.py").read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not [n for n in names if n.split(".")[0] in ("vcr1", "vcr1_kernels")]


def test_no_task_name_outside_the_tasks_package():
    literal = re.compile(r"""(["'])(""" + "|".join(BUILTIN_TASKS) + r")\1")
    offenders = [f"{path.relative_to(REPO)}:{n}: {line.strip()}"
                 for path in PACKAGE.rglob("*.py") if PACKAGE / "tasks" not in path.parents
                 for n, line in enumerate(path.read_text().splitlines(), 1) if literal.search(line)]
    assert not offenders, "\n".join(offenders)


def test_the_installed_command_runs_the_trainer():
    import shutil
    import subprocess
    import sys
    from importlib.metadata import entry_points

    (script,) = entry_points(group="console_scripts", name="vcr1-train")
    assert script.value == "vcr1.train:cli"
    command = shutil.which("vcr1-train", path=str(Path(sys.executable).parent))  # installed beside this Python
    assert command, "pip install -e . installs the vcr1-train command"
    done = subprocess.run([command, "--max_steps", "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "max_steps must be >= 1" in done.stderr  # parsed and checked as train.py does
