"""``privlm deploy-local``: a real Flower federation on 127.0.0.1, started and stopped for one run.

It starts Flower's own executables as separate processes, each in its own
process group: one ``flower-superlink`` and N ``flower-supernode`` (node i
gets ``partition-id=i num-partitions=N``). Then it submits the privlm Flower
App with ``flwr run``, shows the rounds as they land in the run directory,
and on the way out -- success, failure or Ctrl-C -- terminates every process
it started and all their descendants (SuperExec, ServerApp and ClientApp
processes).

Everything Flower writes (its home, the app, logs, certificates made here) is
under ``RUN_DIR/flower/``; nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from privlm.config import RunConfig
from privlm.errors import ConfigError, FederationError
from privlm.rundir import RunDir, default_run_dir
from privlm.runtime.flower.lifetime import die_with_parent

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
CONNECTION = "privlm-local"
APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "privlm-app"
version = "1.0.0"
description = "privlm: user-level DP-FedAvg (the code is the installed privlm package)"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "privlm"

[tool.flwr.app.components]
serverapp = "privlm.runtime.flower.server_app:app"
clientapp = "privlm.runtime.flower.client_app:app"

[tool.flwr.app.config]
config = ""
run-dir = ""
nodes = 0
"""


def write_app(directory: Path) -> Path:
    """The Flower App directory ``flwr run`` submits: a pyproject naming privlm's apps.

    The code itself is the privlm package installed on the server and on every
    node; the app carries no code of its own.
    """
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(APP_PYPROJECT)
    return directory


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _executable(name: str) -> str:
    """A Flower executable of this Python environment (never another one on PATH)."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise ConfigError(f"{name}: not found; install Flower (pip install privlm installs flwr)")
    return found


@dataclass
class Certificates:
    """TLS material: the CA the nodes trust, and the SuperLink's certificate and key."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def in_dir(cls, directory: Path) -> Certificates:
        c = cls(directory / "ca.crt", directory / "server.pem", directory / "server.key")
        for p in (c.ca, c.cert, c.key):
            if not p.is_file():
                raise ConfigError(f"{p}: missing; a certificates directory holds ca.crt, server.pem and "
                                  "server.key (privlm certs DIR makes them)")
        return c


@dataclass
class Federation:
    """The processes of one local federation, and how to reach it."""

    root: Path  # RUN_DIR/flower
    nodes: int
    certs: Certificates | None = None
    node_auth: bool = False  # only registered SuperNode keys may connect (needs TLS)
    simulation: bool = False  # a SuperLink of Flower's simulation engine; no SuperNode processes
    ray_address: str = ""  # simulation: RAY_ADDRESS of an existing cluster ("" = a local Ray)
    port: int = 0
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["FLWR_HOME"] = str(self.root / "home")
        # Flower starts its helpers (flower-superexec, flwr-serverapp, ...) by name: this environment's first.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.setdefault("PYTHONUNBUFFERED", "1")
        if self.ray_address:
            env["RAY_ADDRESS"] = self.ray_address
        return env

    def _tls_args(self, node: bool) -> list[str]:
        if self.certs is None:
            return ["--insecure"]
        if node:
            return ["--root-certificates", str(self.certs.ca)]
        return ["--ssl-certfile", str(self.certs.cert), "--ssl-keyfile", str(self.certs.key),
                "--ssl-ca-certfile", str(self.certs.ca)]

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / f"{name}.log", "ab") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.env, cwd=self.root, start_new_session=True,
                                    preexec_fn=die_with_parent)
        self.procs[name] = proc
        return proc

    def start(self, timeout: float = 60.0) -> None:
        self.port = free_port()
        home = self.root / "home"
        home.mkdir(parents=True, exist_ok=True)
        security = (f'root-certificates = "{self.certs.ca}"' if self.certs else "insecure = true")
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{HOST}:{self.port}"\n{security}\n')
        extra = ["--simulation"] if self.simulation else []
        if self.node_auth:  # deploy_local has checked that TLS is on
            extra.append("--enable-supernode-auth")
        self._spawn("superlink", [_executable("flower-superlink"), *self._tls_args(False), *extra,
                                  "--disable-runtime-dependency-installation", "--host", HOST,
                                  "--port", str(self.port)])
        self._wait_listening(timeout)
        for i in range(self.nodes):
            self.start_node(i)

    def node_key(self, i: int) -> Path:
        """Node i's authentication key (made and registered with the SuperLink on first use)."""
        from privlm.runtime.flower.certs import make_node_key

        key = self.root / "keys" / f"supernode-{i}"
        if not key.exists():
            make_node_key(key)
            res = self.flwr("supernode", "register", str(key.with_suffix(".pub")), CONNECTION)
            if res.returncode != 0:
                raise FederationError(f"flwr supernode register failed: {(res.stdout + res.stderr).strip()[-300:]}")
        return key

    def start_node(self, i: int, tls: list[str] | None = None, auth_key: Path | None = None) -> subprocess.Popen:
        """SuperNode i (partition i of the data); ``tls``/``auth_key`` replace the federation's settings."""
        auth = []
        if auth_key is not None:
            auth = ["--auth-supernode-private-key", str(auth_key)]
        elif self.node_auth:
            auth = ["--auth-supernode-private-key", str(self.node_key(i))]
        return self._spawn(f"supernode-{i}", [
            _executable("flower-supernode"), *(tls if tls is not None else self._tls_args(True)), *auth,
            "--superlink", f"{HOST}:{self.port}", "--host", HOST, "--port", str(free_port()),
            "--node-config", f"partition-id={i} num-partitions={self.nodes}"])

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs["superlink"].poll() is not None:
                raise FederationError(f"flower-superlink exited at start (code {self.procs['superlink'].returncode}); "
                                f"see {self.root / 'logs' / 'superlink.log'}")
            with closing(socket.socket()) as s:
                if s.connect_ex((HOST, self.port)) == 0:
                    return
            time.sleep(0.1)
        raise FederationError(f"flower-superlink did not listen on {HOST}:{self.port} within {timeout:g} s")

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run([_executable("flwr"), *args], env=self.env, cwd=self.root, capture_output=True,
                              text=True, timeout=timeout)

    def submit(self, app: Path, run_config: dict[str, object], federation: dict[str, object] | None = None) -> int:
        overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        args = ["run", str(app), CONNECTION, "--format", "json", "--run-config", overrides]
        if federation:
            args += ["--federation-config", " ".join(f"{k}={json.dumps(v)}" for k, v in federation.items())]
        res = self.flwr(*args)
        try:
            return int(json.loads(res.stdout)["run-id"])
        except (ValueError, KeyError, TypeError):
            raise FederationError(f"flwr run failed: {(res.stdout + res.stderr).strip()[-500:]}") from None

    def status(self, run_id: int) -> str:
        res = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        try:
            return str(json.loads(res.stdout)["runs"][0]["status"])
        except (ValueError, KeyError, IndexError, TypeError):
            return "unknown"

    def server_log(self, run_id: int) -> str:
        res = self.flwr("log", str(run_id), CONNECTION, "--show")
        return res.stdout + res.stderr

    def stop(self, grace: float = 10.0) -> None:
        """Terminate every process started here and all of their descendants.

        SIGTERM to each process group and each descendant (Flower's SuperExec runs
        in a session of its own), then SIGKILL to whatever is left after ``grace``
        seconds. Descendants are looked up again on every pass, so a ClientApp
        spawned during shutdown is caught too.
        """
        known: set[int] = set()
        sent: set[tuple[int, int]] = set()  # (pid, signal): each signal once per process
        deadline = time.monotonic() + grace
        sig = signal.SIGTERM
        while True:
            known |= {proc.pid for proc in self.procs.values()}
            known |= _descendants(known)
            alive = {p for p in known if _alive(p)}
            if not alive:
                break
            if time.monotonic() > deadline:
                if sig == signal.SIGKILL:
                    log.warning("processes %s did not exit", sorted(alive))
                    break
                sig, deadline = signal.SIGKILL, time.monotonic() + 5.0
            for proc in self.procs.values():
                if (-proc.pid, sig) not in sent:
                    _signal_group(proc.pid, sig)
                    sent.add((-proc.pid, sig))
            for pid in alive - {p for p, s_ in sent if s_ == sig}:
                _signal(pid, sig)
                sent.add((pid, sig))
            time.sleep(0.2)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass


def _descendants(roots: set[int]) -> set[int]:
    """All processes below any of ``roots`` (one pass over /proc; Linux)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone (only not yet reaped)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def deploy_local(cfg: RunConfig, nodes: int, out: Path | None = None, certificates: Path | None = None,
                 tls: bool = False, node_auth: bool = False, progress: bool = True,
                 run_timeout: float = 24 * 3600.0, on_started=None) -> Path:
    """Run ``cfg`` on a local Flower federation of ``nodes`` SuperNodes; returns the run directory.

    The data set of ``cfg`` is split into ``nodes`` partitions as ``data.silos``
    would split it (one client per node), so ``privlm run --set data.silos=N``
    is the same run in one process. ``certificates`` (a directory with ca.crt,
    server.pem, server.key) or ``tls=True`` (a throwaway CA made in the run
    directory) turn TLS on; ``node_auth`` (with TLS) admits only SuperNodes whose
    keys were registered with ``flwr supernode register``. ``on_started(federation)`` is called once the run is
    submitted (tests use it to inject faults).
    """
    if cfg.data.silos is not None and cfg.data.silos != nodes:
        raise ConfigError(f"data.silos: {cfg.data.silos} does not match --clients {nodes}; each node is one client")
    if nodes < 1:
        raise ConfigError("--clients: need at least one node")
    if node_auth and certificates is None and not tls:
        raise ConfigError("--node-auth: SuperNode authentication needs TLS (add --tls or --certificates)")
    cfg = cfg.model_copy(deep=True)
    cfg.data.silos = nodes
    certs = Certificates.in_dir(certificates.resolve()) if certificates is not None else None
    rd, root = prepare_run_dir(cfg, out)
    if tls and certs is None:
        from privlm.runtime.flower.certs import make_certificates

        certs = Certificates.in_dir(make_certificates(root / "certs", ["127.0.0.1", "localhost"]))
    return run_federation(Federation(root, nodes, certs, node_auth), rd, cfg, nodes, progress=progress,
                          run_timeout=run_timeout, on_started=on_started)


def prepare_run_dir(cfg: RunConfig, out: Path | None) -> tuple[RunDir, Path]:
    """A fresh run directory with ``flower/run.toml`` (the config the ServerApp reads) and the app."""
    rd = RunDir(out or cfg.output.dir or default_run_dir())
    rd.create()
    root = rd.path.resolve() / "flower"
    root.mkdir(exist_ok=True)
    (root / "run.toml").write_text(cfg.to_toml())
    write_app(root / "app")
    return rd, root


def run_federation(fed: Federation, rd: RunDir, cfg: RunConfig, nodes: int, federation: dict | None = None,
                   progress: bool = True, run_timeout: float = 24 * 3600.0, on_started=None) -> Path:
    """Start ``fed``, submit the privlm app for a population of ``nodes``, follow it, stop everything."""
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # a terminated launcher also cleans up
    try:
        fed.start()
        run_id = fed.submit(fed.root / "app", {"config": str(fed.root / "run.toml"),
                                               "run-dir": str(rd.path.resolve()), "nodes": nodes}, federation)
        log.info("submitted Flower run %d to the local SuperLink on port %d", run_id, fed.port)
        if on_started is not None:
            on_started(fed)
        status = _follow(fed, run_id, rd, cfg, progress, run_timeout)
        (fed.root / "serverapp.log").write_text(fed.server_log(run_id))
        if status != "finished:completed":
            raise FederationError(f"the Flower run ended {status!r}; see {fed.root / 'serverapp.log'} "
                            f"and {fed.root / 'logs'}")
        return rd.path
    finally:
        fed.stop()
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _follow(fed: Federation, run_id: int, rd: RunDir, cfg: RunConfig, progress: bool, timeout: float) -> str:
    """Wait for the run to finish, showing its rounds as metrics.jsonl grows."""
    from privlm.console import progress_bar

    bar = progress_bar(progress)
    deadline = time.monotonic() + timeout
    last_poll = 0.0
    status = "unknown"
    try:
        if bar:
            bar.start()
            task = bar.add_task("rounds (Flower)", total=cfg.federation.rounds)
        while time.monotonic() < deadline:
            if bar:
                rows = rd.read_metrics() if rd.metrics_path.exists() else []
                bar.update(task, completed=len(rows))
            if time.monotonic() - last_poll > 2.0:
                last_poll = time.monotonic()
                status = fed.status(run_id)
                if status.startswith("finished"):
                    return status
                dead = [n for n, p in fed.procs.items() if n == "superlink" and p.poll() is not None]
                if dead:
                    return "superlink exited"
            time.sleep(0.2)
        return f"timed out after {timeout:g} s ({status})"
    finally:
        if bar:
            bar.stop()
