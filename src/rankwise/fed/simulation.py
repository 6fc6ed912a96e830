"""A one-machine Flower simulation: a private SuperLink, ``flwr run``, everything stopped after.

``flwr run`` against its ``:local:`` connection starts a SuperLink it leaves running; instead
rankwise starts its own (``--simulation``, loopback, a free port, Flower's in-memory database,
runtime dependency installation off) under a temporary ``FLWR_HOME`` in a new process group,
submits the app with ``flwr run --stream``, and stops that group (the SuperLink, its
simulation process and Ray's workers) when the run ends or fails. The app bundle holds only a
``pyproject.toml`` naming ``rankwise.fed.app``: bundles are capped at 10 MB, so models and data
come from node-local paths.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from rankwise.errors import RankwiseError
from rankwise.fed.flower import need_flower

APP_TOML = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "rankwise-fed"
version = "1.0.0"
description = "rankwise federated LoRA"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "rankwise"

[tool.flwr.app.components]
serverapp = "rankwise.fed.app:server_app"
clientapp = "rankwise.fed.app:client_app"

[tool.flwr.app.config]
rankwise-config = ""
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_app(folder: Path) -> Path:
    """The Flower app bundle's folder: one pyproject.toml naming rankwise's apps."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(APP_TOML)
    return folder


def flower_env(home: Path) -> dict[str, str]:
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_DISABLE_UPDATE_CHECK="1")
    env.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    env.setdefault("RAY_DEDUP_LOGS", "0")
    return env


def wait_healthy(process: subprocess.Popen, port: int, log: Path, seconds: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RankwiseError(f"the SuperLink exited with {process.returncode}; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RankwiseError(f"the SuperLink did not answer on 127.0.0.1:{port}; see {log}")


def descendants(root: int) -> list[int]:
    """Every process below ``root`` (read from /proc; Ray starts some in their own sessions)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def stop_group(process: subprocess.Popen, seconds: float = 15) -> None:
    """Stop the SuperLink we started and every process below it: SIGTERM to its group and to
    each descendant by pid, SIGKILL to what is left after ``seconds``."""
    below = descendants(process.pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        for pid in below:
            if alive(pid):  # never signal a pid that has already gone (it may be reused)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and (
            process.poll() is None or any(alive(pid) for pid in below)
        ):
            time.sleep(0.1)
        if process.poll() is not None and not any(alive(pid) for pid in below):
            break
    process.wait()


def simulate(config_path: Path, clients: int, output: Path, client_cpus: int = 1) -> None:
    """Run the app in a private simulation SuperLink with ``clients`` virtual SuperNodes."""
    need_flower("flower")
    need_flower("simulation")
    home = Path(tempfile.mkdtemp(prefix="rankwise-flwr-home-"))
    port = free_port()
    log = output / "superlink.log"
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "rankwise"\n\n[superlink.rankwise]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = flower_env(home)
    command = [
        shutil.which("flower-superlink") or "flower-superlink",
        "--insecure",
        "--simulation",
        "--isolation",
        "subprocess",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
    ]
    with log.open("w") as log_file:
        superlink = subprocess.Popen(
            command, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_healthy(superlink, port, log)
        app = write_app(home / "app")
        federation = (
            f"num-supernodes={clients} client-resources-num-cpus={client_cpus} "
            "client-resources-num-gpus=0.0"
        )
        run = [
            shutil.which("flwr") or "flwr",
            "run",
            str(app),
            "rankwise",
            "--stream",
            "--run-config",
            f"rankwise-config={json.dumps(str(config_path))}",
            "--federation-config",
            federation,
        ]
        finished = subprocess.run(run, env=env, check=False)
        if finished.returncode != 0:
            raise RankwiseError(f"flwr run exited with {finished.returncode}; see {log}")
    finally:
        stop_group(superlink)
        shutil.rmtree(home, ignore_errors=True)
