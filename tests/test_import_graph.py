"""Every import in the package points down (issue 28; docs/DESIGN.md §6): the graph of d2sm_ext's
modules, read from their source with ast — imports at module level and inside functions alike —
has no cycle, and d2sm_ext/distributed.py (the process-group primitives) imports nothing of the
package. Its one reference up, the lazy re-export of the model-level queue helpers in its module
``__getattr__`` (PEP 562: run at attribute access, once both modules are loaded), is checked on
its own: it reaches the queue package only, and gives the very functions the queue exports."""
import ast
import pathlib

import d2sm_ext
import d2sm_ext.distributed
import d2sm_ext.queue

PACKAGE = pathlib.Path(d2sm_ext.__file__).parent
LAZY = ("d2sm_ext.distributed", "__getattr__")  # (module, function): the documented lazy re-export


def _modules() -> dict:
    """{dotted name: path} of every module of the package (a package under its own name)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _loaded(node, module: str) -> set:
    """The package's modules an import statement in ``module`` loads: the module named and the
    packages it sits in, except the root (which every import passes through: it is the top) and
    ``module``'s own packages (loaded before it, whatever it imports)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            parts = module.split(".")
            if MODULES[module].name != "__init__.py":
                parts = parts[:-1]
            parts = parts[:len(parts) - (node.level - 1)]
            base = ".".join(parts + ([node.module] if node.module else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    out = set()
    for name in names:
        parts = name.split(".")
        out |= {".".join(parts[:i]) for i in range(2, len(parts) + 1) if ".".join(parts[:i]) in MODULES}
    parts = module.split(".")
    return out - {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def _imports(module: str) -> tuple:
    """(what ``module`` imports, what its lazy re-export imports)."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    eager, lazy = set(), set()
    for statement in tree.body:
        lazy_here = isinstance(statement, ast.FunctionDef) and (module, statement.name) == LAZY
        for node in ast.walk(statement):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                (lazy if lazy_here else eager).update(_loaded(node, module))
    return eager, lazy


GRAPH = {m: _imports(m)[0] for m in MODULES}


def _cycle(graph: dict):
    """A cycle of ``graph`` as a list of nodes (first = last), or None."""
    state, path = {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_reader_sees_module_and_function_level_imports():
    assert "d2sm_ext.distributed" in GRAPH["d2sm_ext.queue.ring"]  # module level, relative
    assert {"d2sm_ext.queue", "d2sm_ext.queue.statistics"} <= GRAPH["d2sm_ext.backends"]  # a submodule: its package too
    assert "d2sm_ext.demo" in GRAPH["d2sm_ext.cli"]  # inside a function
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle():
    assert _cycle(GRAPH) is None, " -> ".join(_cycle(GRAPH))


def test_distributed_is_primitives_below_the_queue():
    eager, lazy = _imports("d2sm_ext.distributed")
    assert eager == set(), eager  # torch only
    assert lazy and all(m == "d2sm_ext.queue" or m.startswith("d2sm_ext.queue.") for m in lazy), lazy
    for name in ("full_state_dict", "ddp_ignore_queues", "queue_buffer_names"):
        assert getattr(d2sm_ext.distributed, name) is getattr(d2sm_ext.queue, name)
    from d2sm_ext.distributed import ddp_ignore_queues, scale_local_gradient  # noqa: F401  (both still import)
