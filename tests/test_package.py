"""The package's own structure: no import cycle among its modules, and state
that belongs to the launcher is reset in every process forked from it."""
import ast
import pathlib
import textwrap

import pytest

import fastspawn
from conftest import run_python

PACKAGE = pathlib.Path(fastspawn.__file__).parent


def _package_modules() -> set:
    return {p.name.split(".")[0] for p in PACKAGE.iterdir() if p.suffix in (".py", ".so")}


def import_graph() -> dict:
    """module -> the package's modules it imports, anywhere in its body (function
    bodies too: a lazy import is still a dependency)."""
    modules = _package_modules()
    graph = {}
    for path in sorted(PACKAGE.glob("*.py")):
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module is None:  # from . import a, b: submodules, or names of __init__
                    targets |= {a.name if a.name in modules else "__init__" for a in node.names}
                else:
                    targets.add(node.module.split(".")[0])
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                parts = node.module.split(".")
                if parts[0] == "fastspawn":
                    targets.add(parts[1] if len(parts) > 1 else "__init__")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    if parts[0] == "fastspawn":
                        targets.add(parts[1] if len(parts) > 1 else "__init__")
            elif isinstance(node, ast.ImportFrom) and node.level > 1:
                raise AssertionError(f"{path.name}: import from outside the package")
        graph[path.stem] = targets - {path.stem}
    return graph


def find_cycle(graph: dict):
    """One import cycle as a list of modules, or None."""
    state = {}  # module -> "open" while on the DFS stack, "done" after

    def visit(module, stack):
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep, stack + [dep])
                if found:
                    return found
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module, [module])
            if found:
                return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_among_the_package_modules():
    graph = import_graph()
    assert {"_launch", "_zygote", "_child", "_guardian", "_report"} <= set(graph)
    assert "_launch" in graph["__init__"]  # the parser sees `from ._launch import ...`
    assert "_guardian" in graph["_zygote"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    # Only the package's facade imports the package itself.
    importers = [m for m, deps in graph.items() if "__init__" in deps]
    assert importers == [], f"{importers} import fastspawn/__init__.py"


# ----------------------------------------------------------------- after fork


def launcher_state(i):
    return (sorted(fastspawn._guardian.watched()), len(fastspawn._launch._live_contexts),
            fastspawn._zygote._zygote is None)


@pytest.mark.parametrize("method", ["fork", "zygote"])
def test_a_rank_starts_without_the_launchers_bookkeeping(method, no_leaks):
    # The launcher watches the zygote and each rank started so far, and holds
    # this job's context while it forks the next rank: none of it is the rank's.
    assert fastspawn._guardian.watched() and fastspawn._zygote._zygote is not None
    assert fastspawn.spawn(launcher_state, nprocs=2, start_method=method) == [([], 0, True)] * 2


HOOK_MODULE = """
import os
ran = []
os.register_at_fork(after_in_child=lambda: ran.append(os.getpid()))
"""

HOOK_LAUNCHER = """
import os, sys
import fastspawn
import fork_hook  # registers its hook here, and in the zygote (preloaded there)

def ran_in_me(i):
    return fork_hook.ran == [os.getpid()]

print(fastspawn.spawn(ran_in_me, nprocs=2, start_method="fork"),
      fastspawn.spawn(ran_in_me, nprocs=2, start_method="zygote"))
"""


def test_at_fork_hooks_run_in_ranks_of_both_c_fork_paths(tmp_path):
    # Group.fork (start_method="fork") and fork_rank (the zygote) call
    # PyOS_AfterFork_Child, so os.register_at_fork hooks run in every rank.
    (tmp_path / "fork_hook.py").write_text(HOOK_MODULE)
    out = run_python(textwrap.dedent(HOOK_LAUNCHER), cwd=tmp_path,
                     extra_env={"FASTSPAWN_ZYGOTE_PRELOAD": "torch,fork_hook",
                                "PYTHONPATH": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[True,", "True]", "[True,", "True]"]



# ----------------------------------------------------------------- Group.info


def test_rank_info_reads_the_tuple_and_the_named_structure():
    import collections

    from fastspawn._rankinfo import RankInfo

    exited = fastspawn._C.PROC_EXITED
    from_tuple = RankInfo.from_c((4242, exited, 0, 9, 2, 1, 1))  # the binding before
    assert from_tuple == (4242, exited, 0, 9, 2, True, True, -1, None)
    assert (from_tuple.pid, from_tuple.signal, from_tuple.order) == (4242, 9, 2)
    assert from_tuple.killed is True and getattr(from_tuple, "pidfd", -1) == -1
    assert from_tuple.exited and from_tuple.failed and from_tuple.exitcode == -9
    # A named structure read by name (pidfd and setup_error are not in its tuple).
    named = collections.namedtuple(
        "info", "pid state exit_code signal order killed gone pidfd setup_error")
    from_named = RankInfo.from_c(named(4242, exited, 3, 0, 1, 0, 1, 17, "setsid: EPERM"))
    assert from_named.exitcode == 3 and from_named.pidfd == 17 and from_named.killed is False
    assert from_named.setup_error == "setsid: EPERM"
    running = RankInfo.from_c((7, fastspawn._C.PROC_RUNNING, 0, 0, 0, 0, 0))
    assert not running.exited and not running.failed and running.exitcode is None


def test_rank_info_from_a_live_group(no_leaks):
    ctx = fastspawn.spawn(launcher_state, nprocs=1, join=False, start_method="fork")
    raw = ctx._group.info(0)
    info = ctx._info(0)
    assert info.pid == raw.pid == ctx.pids()[0] and isinstance(info.killed, bool)
    assert info.pidfd == raw.pidfd and info.setup_error is None
    assert ctx.join(timeout=30)
    assert ctx.processes[0].exitcode == 0


# ----------------------------------------------------------------- public API

def _own_public_api():
    """(qualified name, object) of each class and function fastspawn itself
    exports (torch's re-exports aside), and of their public methods."""
    import inspect

    for name in sorted(set(fastspawn.__all__)):
        obj = getattr(fastspawn, name)
        module = getattr(obj, "__module__", None) or ""
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue  # constants: documented by their #: comments
        if not module.startswith("fastspawn"):
            continue
        yield f"{module}.{name}", obj
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if not attr.startswith("_") and (inspect.isfunction(member)
                                                 or isinstance(member, property)):
                    yield f"{module}.{name}.{attr}", member


def test_every_public_name_has_a_docstring():
    names = [name for name, _ in _own_public_api()]
    assert "fastspawn._launch.spawn" in names and "fastspawn._launch.RankProcess.kill" in names
    missing = [name for name, obj in _own_public_api() if not (obj.__doc__ or "").strip()]
    assert missing == []


def test_package_is_typed():
    assert (PACKAGE / "py.typed").exists()
    assert (PACKAGE / "_C.pyi").exists()  # the extension's types, for mypy
