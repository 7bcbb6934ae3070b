"""The wheel: built from this checkout, installed (not editable) into a fresh virtual environment, it holds every
package and data file and runs from a directory that is not the repository.

One module-scoped build + install (about 10 s here with a warm pip cache), then:
- the wheel lists every package directory (each folder with an ``__init__.py`` under the mapped top-level
  folders, found at test time) and every module and data file of them (Serve YAMLs, GPU profiles, traces);
- in the new venv, the Serve YAML's ``import_path`` and the router class path that app sets import, from the
  wheel's files, and the wheel's declared dependencies are satisfied;
- ``halffull simulate`` on a 200-request slice writes a consistent JSON summary.

Dependencies are not downloaded: the new venv sees the project venv's site-packages through a .pth line, which
appends that folder to sys.path without running its own .pth files (so the editable install's finder of
halffull never loads), and after the venv's own site-packages (so the wheel's halffull wins anyway).
Every import check asserts the file came from the new venv.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# Import package -> source folder, as pyproject.toml's [tool.setuptools.package-dir] maps them.
PACKAGE_DIRS = {"halffull": "halffull", "halffull.router": "router", "halffull.replicas": "replicas",
                "halffull.deploy": "deploy", "halffull.loadtest": "loadtest"}
# Data shipped beside the code (pyproject.toml's package-data): source globs relative to the repository.
DATA_GLOBS = ["replicas/sim/*.yaml", "deploy/*.yaml", "deploy/sim_tokenizer/*.json", "loadtest/data/traces/*"]
SIM_LIMIT = 200

# slow: a pip build + a new venv (10 s on an idle machine, 30 s under load); CI runs slow tests too.
pytestmark = pytest.mark.slow


def source_files() -> list[Path]:
    """The checkout's files as git sees them (tracked + untracked, not ignored, still on disk), repo-relative."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    return sorted({Path(p) for p in out.split("\0") if p and (ROOT / p).is_file()})


def wheel_name(source: Path) -> str | None:
    """Where a source file lands in the wheel (halffull/<package path>/...), or None outside every package."""
    top, *rest = source.parts
    for package, folder in PACKAGE_DIRS.items():
        if top == folder:
            return "/".join([*package.split("."), *rest])
    return None


def run(cmd: list[str], cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


def clean_env() -> dict:
    """This environment without anything that would put the checkout on the new venv's import path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel, new venv's python, the venv, a work dir outside the repository, the environment to run in)."""
    tmp = tmp_path_factory.mktemp("packaging")
    env = clean_env()
    # Build from a copy of the checkout's files: building in place would leave build/ and *.egg-info in it.
    src = tmp / "src"
    for rel in source_files():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes((ROOT / rel).read_bytes())
    dist = tmp / "dist"
    # Build isolation on, as a user's `pip wheel .` does: this also checks [build-system] requires.
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(src)], tmp, env)
    (wheel,) = dist.glob("halffull-*.whl")
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp, env)
    python = venv / "bin" / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                    tmp, env).stdout.strip())
    (site / "halffull_test_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    # The project venv's pip installs into the new one (--python); --no-deps --no-index: the wheel alone.
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
         str(wheel)], tmp, env)
    work = tmp / "work"
    work.mkdir()
    return wheel, python, venv, work, env


def test_wheel_holds_every_package_module_and_data_file(installed):
    """Each folder with an __init__.py under the mapped folders is a package in the wheel, with all its .py
    files; the Serve YAMLs, GPU profiles and shipped traces are there too. A package missing from
    pyproject.toml's list (e.g. a new subpackage) fails here, not on a user's machine."""
    wheel, *_ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    files = source_files()
    package_dirs = {f.parent for f in files if f.name == "__init__.py" and wheel_name(f)}
    assert {Path(d).parts[0] for d in package_dirs} >= set(PACKAGE_DIRS.values())
    expected = {wheel_name(f) for f in files if f.parent in package_dirs and f.suffix == ".py"}
    data = {wheel_name(f) for glob in DATA_GLOBS for f in files if f.match(glob)}
    assert any(d.endswith("profiles.yaml") for d in data) and any("/traces/" in d for d in data)
    assert any(d.endswith("serve_config.yaml") for d in data)
    missing = sorted((expected | data) - names)
    assert not missing, (f"missing from {wheel.name}: {missing} (a new package must be listed in pyproject.toml's "
                         "[tool.setuptools] packages, a new data file in its package-data)")


def test_serve_import_paths_come_from_the_wheel(installed):
    """The Serve YAML's import_path builds the app from the installed wheel, and the request-router class path
    that app sets (``request_router_config.request_router_class``) imports too, both from the new venv."""
    _, python, venv, work, env = installed
    import_path = yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text())["applications"][0]
    script = textwrap.dedent(f"""
        import importlib, json, sys
        def load(path):
            module, _, attr = path.partition(":")
            return importlib.import_module(module), getattr(importlib.import_module(module), attr)
        import halffull
        app_cfg = {json.dumps(import_path)}
        builder_module, build_app = load(app_cfg["import_path"])
        app = build_app(app_cfg.get("args") or {{}})
        replica = app._bound_deployment.init_args[0]._bound_deployment
        router_path = replica._deployment_config.request_router_config.request_router_class
        router_module, router_cls = load(router_path)
        print(json.dumps({{"halffull": halffull.__file__, "builder": builder_module.__file__,
                          "router_path": router_path, "router": router_module.__file__,
                          "router_cls": router_cls.__name__}}))
    """)
    seen = json.loads(run([str(python), "-c", script], work, env).stdout.strip().splitlines()[-1])
    assert seen["router_path"] == "halffull.router.serve_router:HalffullRequestRouter"
    assert seen["router_cls"] == "HalffullRequestRouter"
    for key in ("halffull", "builder", "router"):
        assert Path(seen[key]).is_relative_to(venv), f"{key} imported from {seen[key]}, not the wheel"


def test_declared_dependencies_are_satisfied(installed):
    """Every dependency the wheel declares (no extras) is installed at an allowed version where it runs."""
    _, python, _, work, env = installed
    script = textwrap.dedent("""
        import importlib.metadata as md
        from packaging.requirements import Requirement
        bad = []
        for line in md.requires("halffull"):
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue  # an optional extra
            try:
                version = md.version(req.name)
            except md.PackageNotFoundError:
                bad.append(f"{req}: not installed")
                continue
            if not req.specifier.contains(version, prereleases=True):
                bad.append(f"{req}: found {version}")
        print("\\n".join(bad) or "ok")
    """)
    assert run([str(python), "-c", script], work, env).stdout.strip() == "ok"


def test_simulate_runs_from_outside_the_repository(installed):
    """The installed ``halffull`` command replays a slice of a shipped trace (found in the wheel, not the
    checkout) and writes a JSON summary that accounts for every request."""
    _, python, venv, work, env = installed
    out = work / "out.json"
    cli = venv / "bin" / "halffull"
    result = run([str(cli), "simulate", "--trace", "azure_conv", "--limit", str(SIM_LIMIT), "--json", str(out)],
                 work, env)
    summary = json.loads(out.read_text())
    assert summary["trace"] == "azure_conv", result.stdout
    assert summary["completed"] == SIM_LIMIT and summary["failed"] == 0
    per_replica = summary["per_replica"]
    assert len(per_replica) == summary["config"]["num_replicas"]
    assert sum(r["requests"] for r in per_replica) == summary["completed"]
