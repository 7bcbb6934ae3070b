"""The layout rules of DESIGN.md §2, checked on the source tree (no imports of the code under test):

- no import circles among halffull modules: the module import graph, built with ``ast`` from every import
  statement (module level, function level, ``if`` branches alike) and every ``importlib.import_module("...")``
  with a literal name, has no cycle;
- imports go one way between the top-level folders, down ``LAYERS`` (the data flow of DESIGN.md §3): nothing
  imports a folder above its own (the router never reaches into replicas/; shared helpers such as the
  prefix-block hash sit in the thin ``halffull`` package below both);
- router/ and replicas/ import neither Ray nor vLLM, except the adapters listed in ``RAY_ALLOWED`` /
  ``VLLM_ALLOWED``; Ray's request-router API only where ``ROUTER_API_ALLOWED`` says;
- every package directory (a folder with ``__init__.py`` under a folder pyproject.toml maps into the ``halffull``
  namespace) is listed in pyproject.toml's ``packages``; found at test time, so new subpackages are covered.

An import edge a -> b means "importing a may import b"; importing ``x.y.z`` also runs the ``__init__`` of ``x``
and ``x.y``, so those are edges too, except a module's own parent packages (already initialized when it runs).
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Import package -> source folder (pyproject.toml's [tool.setuptools.package-dir]).
PACKAGE_DIRS: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]

# Source files (repo-relative) of router/ and replicas/ allowed to import Ray, and why.
RAY_ALLOWED = {
    "router/serve_router.py": "the Ray Serve RequestRouter adapter",
    "replicas/deployment.py": "the LLMReplica Serve deployment (the Serve adapter of replicas/)",
}
# Folders and files of router/ and replicas/ allowed to import vLLM.
VLLM_ALLOWED = ("replicas/vllm/",)
# Ray's request-router API (alpha): the adapter, and the benchmark that drives the adapter with fake replicas.
ROUTER_API = "ray.serve.request_router"
ROUTER_API_ALLOWED = ("router/serve_router.py", "loadtest/bench/serve.py")
CORE_FOLDERS = ("router/", "replicas/")
# Bottom to top: a module may import its own layer and the layers below it.
LAYERS = ("halffull", "halffull.router", "halffull.replicas", "halffull.deploy", "halffull.loadtest")


# ---- the module graph -------------------------------------------------------------------------------------
def package_dirs(root: Path, package_dir: dict[str, str]) -> dict[str, Path]:
    """Import name -> folder of every package (folder with ``__init__.py``) under the mapped folders."""
    out: dict[str, Path] = {}
    for package, folder in package_dir.items():
        base = root / folder
        for init in sorted(base.rglob("__init__.py")):
            rel = init.parent.relative_to(base).parts
            if "__pycache__" in rel or not all((base.joinpath(*rel[:k]) / "__init__.py").is_file()
                                               for k in range(len(rel))):
                continue  # a folder inside a non-package folder is not importable as part of the namespace
            out[".".join([package, *rel])] = init.parent
    return out


def module_files(root: Path, package_dir: dict[str, str]) -> dict[str, Path]:
    """Import name -> source file of every module of every package (``__init__.py`` under the package's name)."""
    out: dict[str, Path] = {}
    for package, folder in package_dirs(root, package_dir).items():
        for path in sorted(folder.glob("*.py")):
            out[package if path.name == "__init__.py" else f"{package}.{path.stem}"] = path
    return out


def _absolute(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute module name of a (possibly relative) ``from`` import."""
    if level == 0:
        return name or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, name] if name else base)


def imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every module name the source may import: import statements anywhere, ``from x import y`` as both ``x``
    and ``x.y`` (y may be a submodule), and ``importlib.import_module`` / ``import_module`` with a literal."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, is_package, node.level, node.module)
            if base:  # empty: ``from .. import x`` at the top of the namespace
                out.add(base)
            out.update(f"{base}.{alias.name}".lstrip(".") for alias in node.names if alias.name != "*")
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"):
            out.add(node.args[0].value)
    return out


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts))]


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of ``modules`` it may import (directly), with the packages those run."""
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        own = set(_ancestors(module))
        edges: set[str] = set()
        for name in imported_names(tree, module, path.name == "__init__.py"):
            for target in [*_ancestors(name), name]:
                # Why skip its own packages: they are initialized before the module runs (no new import).
                if target in modules and target != module and target not in own:
                    edges.add(target)
        graph[module] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted; sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def one_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A concrete path ``a -> b -> ... -> a`` inside a strongly connected component (for the message)."""
    members = set(component)
    start = component[0]
    path, seen = [start], {start}
    while True:
        nxt = sorted(w for w in graph[path[-1]] if w in members)
        back = [w for w in nxt if w == start]
        if back and len(path) > 1:
            return path + [start]
        step = next((w for w in nxt if w not in seen), None)
        if step is None:  # every neighbour seen: close the loop where it re-enters the path
            w = nxt[0]
            return path[path.index(w):] + [w]
        path.append(step)
        seen.add(step)


# ---- the checks on this repository ------------------------------------------------------------------------
MODULES = module_files(ROOT, PACKAGE_DIRS)
SOURCES = {path.relative_to(ROOT).as_posix(): module for module, path in MODULES.items()}
GRAPH = import_graph(MODULES)


def _imports_of(rel: str) -> set[str]:
    path = ROOT / rel
    return imported_names(ast.parse(path.read_text()), SOURCES[rel], path.name == "__init__.py")


def _top(names: set[str], top: str) -> list[str]:
    return sorted(n for n in names if n == top or n.startswith(top + "."))


def test_the_tree_is_found():
    for module in ("halffull", "halffull.router.serve_router", "halffull.replicas.engine.policies",
                   "halffull.deploy.app", "halffull.loadtest.cli", "halffull.loadtest.sim.cluster"):
        assert module in MODULES, module


def test_no_import_cycles():
    found = [" -> ".join(one_cycle(GRAPH, c)) for c in cycles(GRAPH)]
    assert not found, "import cycles among halffull modules:\n  " + "\n  ".join(found)


def layer(module: str) -> int:
    """Index in ``LAYERS`` of the highest layer that is ``module`` or a package above it."""
    return max(k for k, name in enumerate(LAYERS) if module == name or module.startswith(name + "."))


@pytest.mark.parametrize("module", sorted(MODULES), ids=sorted(MODULES))
def test_imports_go_down_the_layers(module):
    up = sorted(m for m in GRAPH[module] if layer(m) > layer(module))
    assert not up, f"{module} ({LAYERS[layer(module)]}) imports {up} from a layer above it: {' < '.join(LAYERS)}"


CORE = sorted(rel for rel in SOURCES if rel.startswith(CORE_FOLDERS))


@pytest.mark.parametrize("rel", CORE, ids=CORE)
def test_core_modules_import_neither_ray_nor_vllm(rel):
    names = _imports_of(rel)
    if rel not in RAY_ALLOWED:
        assert not _top(names, "ray"), f"{rel} imports Ray ({_top(names, 'ray')}); only {sorted(RAY_ALLOWED)} may"
    if not rel.startswith(VLLM_ALLOWED):
        assert not _top(names, "vllm"), f"{rel} imports vLLM ({_top(names, 'vllm')}); only {VLLM_ALLOWED} may"


@pytest.mark.parametrize("rel", sorted(SOURCES), ids=sorted(SOURCES))
def test_only_the_adapter_imports_rays_request_router_api(rel):
    if rel not in ROUTER_API_ALLOWED:
        assert not _top(_imports_of(rel), ROUTER_API), f"{rel} imports {ROUTER_API}"


@pytest.mark.parametrize("rel", [*RAY_ALLOWED, *ROUTER_API_ALLOWED, *VLLM_ALLOWED])
def test_every_allowed_entry_exists(rel):
    # A stale exception would silently allow a new module of that name.
    assert (ROOT / rel).exists(), f"{rel} is allowed in test_layout.py but is not in the tree"


PACKAGES = sorted(package_dirs(ROOT, PACKAGE_DIRS))


@pytest.mark.parametrize("package", PACKAGES, ids=PACKAGES)
def test_every_package_directory_is_listed_in_pyproject(package):
    folder = package_dirs(ROOT, PACKAGE_DIRS)[package].relative_to(ROOT)
    assert package in PYPROJECT["tool"]["setuptools"]["packages"], (
        f"{package} ({folder}/) is not in pyproject.toml's [tool.setuptools] packages")


# ---- the checker itself, on a made-up tree ----------------------------------------------------------------
FAKE = {
    "pkg/__init__.py": "",
    "pkg/a.py": "from pkg import b\n",
    "pkg/b.py": "def f():\n    from pkg.sub import c  # function level\n",
    "pkg/sub/__init__.py": "",
    "pkg/sub/c.py": "from ..a import x\n",                     # relative, back to a: a -> b -> sub.c -> a
    "pkg/d.py": "import importlib\nimportlib.import_module('pkg.e')\n",
    "pkg/e.py": "import pkg.d\n",                             # d -> e -> d through import_module
    "pkg/f.py": "import os\nfrom pkg.sub import c\n",       # into the cycle, not on it
    "pkg/loose/g.py": "import pkg.f\n",                      # no __init__.py: not a module of the namespace
}


@pytest.fixture
def fake_tree(tmp_path):
    for rel, text in FAKE.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def test_checker_finds_function_level_relative_and_import_module_cycles(fake_tree):
    modules = module_files(fake_tree, {"pkg": "pkg"})
    assert sorted(modules) == ["pkg", "pkg.a", "pkg.b", "pkg.d", "pkg.e", "pkg.f", "pkg.sub", "pkg.sub.c"]
    graph = import_graph(modules)
    assert graph["pkg.f"] == {"pkg.sub", "pkg.sub.c"}  # own package pkg skipped, pkg.sub's __init__ counted
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c"], ["pkg.d", "pkg.e"]]
    assert one_cycle(graph, ["pkg.a", "pkg.b", "pkg.sub.c"]) == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]


@pytest.mark.parametrize("text, names", [
    ("import ray", {"ray"}),
    ("import ray.serve as s", {"ray.serve"}),
    ("from ray.serve.request_router import PendingRequest", {"ray.serve.request_router",
                                                             "ray.serve.request_router.PendingRequest"}),
    ("def f():\n    from vllm import SamplingParams", {"vllm", "vllm.SamplingParams"}),
    ("try:\n    import vllm\nexcept ImportError:\n    pass", {"vllm"}),
    ("from . import sibling", {"pkg", "pkg.sibling"}),
    ("from .. import up", {"up"}),  # from pkg.mod (a module): ``..`` is the parent of pkg
    ("x = 'import ray'", set()),
], ids=["import", "import-as", "from", "function-level", "guarded", "relative", "relative-up", "string"])
def test_imported_names(text, names):
    assert imported_names(ast.parse(text), "pkg.mod", False) == names
