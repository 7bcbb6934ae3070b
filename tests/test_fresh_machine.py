"""The README's quick start works on a fresh machine and cleans up after itself.

A ``git clone`` of the committed repository (HEAD; the lead commits, so this tests what is committed) runs the
README's quick-start command exactly as written, with an EMPTY home directory: no ~/.ray (no Ray auth token left
by earlier runs), no pip cache, no user pip config. Machine-wide settings stay (PATH's Python, /etc/pip.conf,
/etc/xdg/pip, PIP_* variables pointing at the machine's package mirrors), as on a new user's first day. The
command creates the clone's own .venv (pip-installs Ray and the rest), serves the simulated fleet on
127.0.0.1:8000, and must print a completion (curl) and a streamed chat with its usage line, exit 0, and leave no
process and no listener behind. It took 1.5 min on an idle 2-core machine here, 4-5 min with other tests running.

The second test runs one Ray test of this suite with an empty HOME: the suite neither needs nor leaves a Ray token
(or anything else) in the user's home.

HALFFULL_FRESH_REPO names another repository (or clone) to test instead of this one, e.g. a scratch clone with
uncommitted changes committed in it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = Path(os.environ.get("HALFFULL_FRESH_REPO", ROOT))
# The quick start's fixed listeners: the Ray GCS (HALFFULL_RAY_PORT default), the HTTP front
# (deploy/serve_config.yaml), and in HAProxy mode Ray's defaults for HAProxy's stats page and Prometheus exporter
# and for Serve's fallback proxy (deploy/ray_env.py). No other test binds them (the session cluster uses free
# ports).
PORTS = (6390, 8000, 8404, 9101, 8500)
TIMEOUT_S = 20 * 60
USAGE = re.compile(r"^\[usage\] (\d+) prompt \+ (\d+) completion tokens$")
# Variables that would point the run at this session's Ray cluster, venv, checkout or user caches.
DROP_PREFIXES = ("RAY_", "HALFFULL_", "PYTEST_", "XDG_")
DROP = {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PIP_CACHE_DIR", "PIP_USER"}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(TIMEOUT_S + 300)]


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def fresh_env(home: Path) -> dict:
    """This machine's environment with an empty HOME and nothing of this test session (its Ray token and
    cluster address, the project .venv on PATH)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(DROP_PREFIXES) and k not in DROP}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep)
                                  if p and not Path(p).resolve().is_relative_to(ROOT))
    env["HOME"] = str(home)
    return env


def readme_quickstart(readme: Path) -> str:
    """The one command in the README's "Quick start" section (its first ```bash block)."""
    section = readme.read_text().split("## Quick start", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    (command,) = [line for line in block.splitlines() if line.strip()]
    return command.strip()


def started_by(home: Path, clone: Path) -> list[tuple[int, str]]:
    """Live processes this run started: each inherits HOME=<our empty home> (Ray's head, raylet, GCS, workers
    and Serve actors all do), or has the clone in its command line."""
    marker, found = f"HOME={home}".encode() + b"\0", []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue  # exited meanwhile, or not ours to read
        if cmdline and (marker in b"\0" + environ or str(clone) in cmdline):
            found.append((int(proc.name), cmdline))
    return found


def kill_all(procs: list[tuple[int, str]]) -> None:
    """SIGKILL processes this run started (found by started_by, so never anyone else's)."""
    for pid, _ in procs:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def halffull_location(python: Path, env: dict) -> Path:
    """Where ``python`` imports halffull from."""
    out = subprocess.run([str(python), "-c", "import halffull; print(halffull.__file__)"], env=env,
                         cwd=python.parent, capture_output=True, text=True, timeout=60, check=True)
    return Path(out.stdout.strip())


def project_venv_untouched(clone: Path) -> bool:
    """The project .venv (if any) names no file of the clone: the run installed nothing there. (Compared by
    content, not mtimes: other work on this checkout may reinstall into it meanwhile.)"""
    venv = ROOT / ".venv"
    text = "".join(p.read_text(errors="replace") for p in venv.glob("lib/python*/site-packages/*.pth"))
    text += "".join(p.read_text(errors="replace") for p in venv.glob("lib/python*/site-packages/__editable__*"))
    return str(clone) not in text


def ray_pin() -> str:
    """The Ray version pyproject.toml pins (``ray[serve]==X``)."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d.split("==", 1)[1] for d in deps if re.match(r"ray(\[[^\]]*\])?==", d)]
    return pin.strip()


def index_reachable(env: dict, cwd: Path) -> bool:
    """Whether pip, configured as on this machine but with the empty HOME, finds Ray's pinned release."""
    try:
        out = subprocess.run(["python3", "-m", "pip", "index", "versions", "ray"], env=env, cwd=cwd,
                             capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and re.search(rf"(?<![\d.]){re.escape(ray_pin())}(?![\d.])", out.stdout) is not None


def check_demo_output(stdout: str) -> None:
    """The output ends with the curl completion (JSON, choices[0].text), then the streamed chat text and its
    usage line, then only the stop messages."""
    lines = stdout.splitlines()
    curl_at = next(i for i, line in enumerate(lines) if line.startswith("[serve_local] curl "))
    completion = json.loads(lines[curl_at + 1])
    assert isinstance(completion["choices"][0]["text"], str) and completion["choices"][0]["text"].strip()
    chat_at = lines.index("[serve_local] openai client, streaming chat")
    usage_at = next(i for i in range(chat_at, len(lines)) if USAGE.match(lines[i]))
    streamed = " ".join(lines[chat_at + 1:usage_at]).strip()
    prompt_tokens, completion_tokens = map(int, USAGE.match(lines[usage_at]).groups())
    assert streamed and prompt_tokens > 0 and completion_tokens > 0
    tail = lines[usage_at + 1:]
    assert tail and all(line.startswith("[serve_local] ") for line in tail), tail
    assert tail[-1] == "[serve_local] stopped"


def test_readme_quickstart_on_a_fresh_machine():
    """`bash deploy/quickstart.sh` from a fresh clone with an empty HOME: exit 0, completion + streamed chat
    printed, a Ray auth token created for this user only, nothing left running or listening, the project
    .venv untouched."""
    busy = [port for port in PORTS if listening(port)]
    if busy:
        pytest.skip(f"127.0.0.1 port(s) {busy} already in use by something outside this test; the quick start "
                    "needs them (stop that service, e.g. `bash deploy/serve_local.sh stop`)")
    scratch = Path(tempfile.mkdtemp(prefix="halffull-fresh-"))
    home, clone = scratch / "home", scratch / "halffull"
    home.mkdir()
    env = fresh_env(home)
    try:
        if not index_reachable(env, scratch):
            pytest.skip("no package index reachable with this machine's pip configuration: a fresh machine "
                        "cannot install Ray")
        subprocess.run(["git", "clone", "--quiet", str(SOURCE), str(clone)], check=True, timeout=300)
        command = readme_quickstart(clone / "README.md")  # `bash deploy/quickstart.sh`, as a reader runs it
        start = time.monotonic()
        proc = subprocess.Popen(["bash", "-c", command], cwd=clone, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            pytest.fail(f"quick start still running after {TIMEOUT_S} s:\n{stdout[-4000:]}\n{stderr[-4000:]}")
        elapsed = time.monotonic() - start
        report = f"after {elapsed:.0f} s, exit {proc.returncode}\n--- stdout\n{stdout[-6000:]}\n--- stderr\n{stderr[-6000:]}"
        print(f"quick start on a fresh clone took {elapsed:.0f} s")
        assert proc.returncode == 0, report
        try:
            check_demo_output(stdout)
        except (AssertionError, StopIteration, ValueError, KeyError, IndexError) as e:
            pytest.fail(f"unexpected demo output ({type(e).__name__}: {e}) {report}")
        token = home / ".ray" / "auth_token"
        assert token.is_file() and token.stat().st_mode & 0o077 == 0, "the auth token must be private"
        time.sleep(2)  # let the last workers of the stopped cluster exit
        leftover = started_by(home, clone)
        assert not leftover, f"processes left running:\n{leftover}"
        assert not [port for port in PORTS if listening(port)], "a quick-start port is still listening"
        # The run used the clone's own new .venv, with halffull from the clone; the project's .venv is not it.
        assert halffull_location(clone / ".venv" / "bin" / "python", env).is_relative_to(clone)
        assert project_venv_untouched(clone), "the quick start installed into the project .venv"
    finally:
        kill_all(started_by(home, clone))  # only if something above failed: never leak a cluster
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.mark.ray
def test_ray_tests_neither_need_nor_leave_state_in_home(tmp_path):
    """A Ray test of this suite, run by pytest with an empty HOME and no RAY_* variables, passes and leaves HOME
    empty: tests/conftest.py gives Ray a session token (RAY_AUTH_TOKEN), so no ~/.ray/auth_token is read or
    written. (Without it, `ray.init()` of a new cluster writes ~/.ray/auth_token.)"""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PYTEST_"))}
    env["HOME"] = str(home)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_serve_e2e.py",
           "-k", "test_models_and_health"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout[-4000:] + result.stderr[-4000:]
    left = sorted(str(p.relative_to(home)) for p in home.rglob("*"))
    assert not left, f"the test run wrote into HOME: {left}"
