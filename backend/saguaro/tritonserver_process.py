"""Running the `tritonserver` binary that the `nvidia-pytriton` wheel bundles, on our own repository.

The wheel ships Triton 2.51 with the Python backend (pytriton/tritonserver/...). We run its binary
directly (not PyTriton's Python API): copy the Python-backend stub built for this Python next to
libtriton_python.so (as PyTriton does), put the wheel's libraries on LD_LIBRARY_PATH, and put the
venv's bin/ first on PATH so that the stub processes run with the venv's packages (see server_env).

The server runs in its own process group so that stopping it also ends the Python-backend stub
processes it spawned (one per model instance).

What the repository's model.py files share (config parameters, tensors, BLS calls) is in
saguaro.triton_models.
"""
from __future__ import annotations

import atexit
import collections
import ctypes
import importlib.util
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

from saguaro.errors import SaguaroError
from saguaro.private_dir import remove_runtime_dir, server_folder
from saguaro.supervisor import StubDeaths, StubSupervisor, post

PACKAGE_ROOT = Path(__file__).resolve().parents[1]                     # backend/ (holds saguaro/)
DEFAULT_MODEL_REPOSITORY = PACKAGE_ROOT.parent / "model_repository"
SETUP_HINT = "run scripts/setup.sh (installs nvidia-pytriton into .venv)"
# Triton's APIs a client must not reach: model-repository loads models, and a load may bring its
# own files (a model.py: code that runs in the server); logging, trace and shared-memory change the
# server's state. tritonserver answers them only with ADMIN_HEADER set to the server's own key (403
# otherwise); our supervisor and `load` send it. The key is on tritonserver's command line, so local
# users who can list processes can read it; clients over HTTP and gRPC cannot.
RESTRICTED_APIS = "model-repository,logging,trace,shared-memory"
ADMIN_HEADER = "saguaro-admin-key"


@dataclass(frozen=True)
class TritonInstall:
    binary: Path       # pytriton/tritonserver/bin/tritonserver
    backends: Path     # --backend-directory (python/ inside, with the stub copied in)
    libs: Path         # the wheel's nvidia_pytriton.libs (libtritonserver, libcudart, ...)


def find_install() -> TritonInstall:
    """Locates the wheel's tritonserver and makes its Python backend usable from this Python."""
    spec = importlib.util.find_spec("pytriton")  # located, not imported: importing it takes 0.3 s
    if spec is None or not spec.submodule_search_locations:
        raise SaguaroError(f"tritonserver: the nvidia-pytriton package is not installed; {SETUP_HINT}")
    root = Path(list(spec.submodule_search_locations)[0]).resolve() / "tritonserver"
    install = TritonInstall(root / "bin" / "tritonserver", root / "backends", root.parents[1] / "nvidia_pytriton.libs")
    for path in (install.binary, install.backends / "python" / "libtriton_python.so", install.libs):
        if not path.exists():
            raise SaguaroError(f"tritonserver: {path} is missing (broken nvidia-pytriton install); {SETUP_HINT}")
    _install_stub(root, install.backends / "python" / "triton_python_backend_stub")
    return install


def system_install(binary: Path) -> TritonInstall:
    """A tritonserver installed the usual way: <prefix>/bin/tritonserver, <prefix>/backends."""
    binary = Path(shutil.which(str(binary)) or binary).resolve()
    backends = binary.parents[1] / "backends"
    if not binary.is_file() or not (backends / "python").is_dir():
        raise SaguaroError(f"--tritonserver: {binary} is not a tritonserver with a Python backend beside it "
                           f"({backends / 'python'} missing)")
    return TritonInstall(binary, backends, binary.parents[1] / "lib")


def _install_stub(root: Path, dst: Path) -> None:
    # The Python backend runs `triton_python_backend_stub` from its own folder; the wheel ships one
    # per Python version, linked against that version's libpython. Python packages the stub imports
    # must be built for that version, so the stub must match the Python of the venv (this one).
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    src = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not src.is_file():
        have = sorted(p.name for p in (root / "python_backend_stubs").glob("3.*"))
        raise SaguaroError(f"tritonserver: no Python backend stub for Python {version} in {src.parents[1]} "
                           f"(stubs: {', '.join(have) or 'none'}); create .venv with one of those Python "
                           f"versions and {SETUP_HINT}")
    if dst.is_file() and dst.read_bytes() == src.read_bytes():
        return
    try:
        tmp = dst.with_suffix(f".tmp{os.getpid()}")  # copy then rename: concurrent starts never see half a file
        shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    except OSError as e:
        raise SaguaroError(f"tritonserver: cannot install the Python backend stub at {dst} ({e}); "
                           f"{SETUP_HINT} as the owner of .venv") from None


def server_env(install: TritonInstall, base: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """Environment for tritonserver and, through it, the Python-backend stubs."""
    env = dict(os.environ if base is None else base)
    libs = [str(install.libs)]
    # Prefer the libpython of the venv's own interpreter (same build as its site-packages) over
    # whatever libpython3.X the dynamic loader would find first.
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and (Path(libdir) / str(sysconfig.get_config_var("INSTSONAME") or "")).is_file():
        libs.insert(0, libdir)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
    # The stub embeds Python in isolated mode (PYTHONPATH is ignored) and finds its prefix by looking
    # up "python3" on PATH: with this interpreter's bin/ first, that is the venv's python3, so the
    # stub's sys.prefix is the venv and its site-packages (torch, tokenizers, the editable saguaro
    # install's .pth) are on sys.path, as PyTriton arranges it too.
    env["PATH"] = os.pathsep.join([str(Path(sys.prefix) / "bin")] + [p for p in [env.get("PATH")] if p])
    env["PYTHONNOUSERSITE"] = "1"
    return env


FREE_PORTS = 12000   # how many ports below the kernel's ephemeral range free_port draws from


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing is bound to, drawn below the kernel's ephemeral range where that leaves room.
    A port of that range (what binding port 0 gives) is the local end of any outgoing connection
    made before the server binds it: a soak's server once refused to start, its metrics port taken
    between the pick and the bind, and a restarted tritonserver would find its loopback port so."""
    low, draw = ephemeral_low(), random.SystemRandom()
    for _ in range(100):
        port = draw.randrange(low - FREE_PORTS, low) if low > FREE_PORTS + 1024 else 0
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise SaguaroError(f"no free port on {host} among 100 tried below {low}; free some, or name the ports")


def ephemeral_low(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> int:
    """The lowest port the kernel hands outgoing connections (Linux; IANA's 49152 elsewhere)."""
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 49152


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is not "in use"
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _die_with_parent() -> None:
    # Runs in the child before exec: own process group (so stop() can end the stubs too), and
    # SIGTERM if the launching process dies without stopping us, so no server outlives a crash.
    # (Strictly, when the launching *thread* exits: start servers from a thread that outlives them.)
    os.setpgid(0, 0)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass


# Log lines worth showing when startup fails: Triton's error lines and the model status table.
_RELEVANT = re.compile(r"^E\d{4} |UNAVAILABLE|error|Error|failed|Traceback|Exception|No module named")
_NOISE = re.compile(r"CudaDriverHelper has not been initialized")  # printed on every start without a GPU


class TritonServer:
    """One tritonserver process on a model repository. Use as a context manager, or start()/stop().

    The server always runs with explicit model control: `models` None loads every model in the
    repository, a list only those (the rest of the repository may be incomplete). `supervise`
    reloads a model whose stub process died (saguaro.supervisor). `binary`: a tritonserver other
    than the nvidia-pytriton wheel's (e.g. /opt/tritonserver/bin/tritonserver in NVIDIA's images). Ports of 0 are replaced by free ones. Server output goes to `log_path` if
    given, to this process's stderr if `echo`, and the last lines are kept for error messages.
    """

    def __init__(self, model_repository: str | Path = DEFAULT_MODEL_REPOSITORY, *, host: str = "127.0.0.1",
                 http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
                 models: Optional[Sequence[str]] = None, log_verbose: int = 0, log_path: Optional[Path] = None,
                 echo: bool = False, extra_args: Sequence[str] = (), supervise: bool = True,
                 binary: Optional[Path] = None, exit_timeout_s: int = 2, http_host: Optional[str] = None,
                 stub_deaths: Optional[StubDeaths] = None) -> None:
        self.model_repository = Path(model_repository).resolve()
        self.host = host
        self.http_host = host if http_host is None else http_host   # saguaro.serve: loopback, behind its HTTP front
        self.http_port, self.grpc_port, self.metrics_port = (
            p or free_port(host) for p in (http_port, grpc_port, metrics_port))
        self.models = list(models) if models is not None else None
        self.log_verbose, self.log_path, self.echo = log_verbose, log_path, echo
        self.extra_args = list(extra_args)
        self.supervise, self.binary, self.exit_timeout_s = supervise, binary, exit_timeout_s
        self.supervisor: Optional[StubSupervisor] = None
        self.stub_deaths = stub_deaths if stub_deaths is not None else StubDeaths()   # what the supervisor finds
        self.admin = {ADMIN_HEADER: secrets.token_urlsafe(32)}          # for RESTRICTED_APIS
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self._log: collections.deque[str] = collections.deque(maxlen=400)
        self._reader: Optional[threading.Thread] = None

    # Addresses in the forms clients take: tritonclient wants "host:port" for HTTP and gRPC.
    @staticmethod
    def _hostport(host: str, port: int) -> str:
        h = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
        return f"[{h}]:{port}" if ":" in h else f"{h}:{port}"

    @property
    def http_url(self) -> str:
        return self._hostport(self.http_host, self.http_port)

    @property
    def grpc_url(self) -> str:
        return self._hostport(self.host, self.grpc_port)

    @property
    def metrics_url(self) -> str:
        return f"http://{self._hostport(self.host, self.metrics_port)}/metrics"

    def command(self, install: TritonInstall) -> list[str]:
        h = self.host
        restricted = f"{RESTRICTED_APIS}:{ADMIN_HEADER}={self.admin[ADMIN_HEADER]}"
        cmd = [str(install.binary), f"--model-repository={self.model_repository}",
               f"--backend-directory={install.backends}", f"--cache-directory={install.backends.parent / 'caches'}",
               f"--http-address={self.http_host}", f"--http-port={self.http_port}",
               f"--grpc-address={h}", f"--grpc-port={self.grpc_port}",
               f"--metrics-address={h}", f"--metrics-port={self.metrics_port}",
               "--allow-gpu-metrics=false", f"--log-verbose={self.log_verbose}",
               # In-flight requests get this long to finish on SIGTERM before the models are
               # unloaded (the orchestrator then ends the rest with a retryable error).
               f"--exit-timeout-secs={self.exit_timeout_s}", "--model-control-mode=explicit",
               f"--http-restricted-api={restricted}", f"--grpc-restricted-protocol={restricted}"]
        cmd += [f"--load-model={m}" for m in (self.models if self.models is not None else ["*"])]
        return cmd + self.extra_args

    def start(self, timeout_s: float = 120.0) -> "TritonServer":
        """Starts the server and waits until /v2/health/ready (all requested models loaded)."""
        if self.proc is not None:
            raise SaguaroError("tritonserver: already started")
        if not self.model_repository.is_dir():
            raise SaguaroError(f"--model-repository: {self.model_repository} is not a folder")
        for flag, host, port in (("--http-port", self.http_host, self.http_port), ("--grpc-port", self.host, self.grpc_port),
                                 ("--metrics-port", self.host, self.metrics_port)):
            if port_in_use(host, port):
                raise SaguaroError(f"{flag}: port {port} on {host} is already in use (another tritonserver?); "
                                   f"stop that process or pick another port")
        install = find_install() if self.binary is None else system_install(self.binary)
        env = server_env(install) if self.binary is None else dict(os.environ)
        self.proc = subprocess.Popen(self.command(install), env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        atexit.register(self.stop)
        self._reader = threading.Thread(target=self._read_log, name="tritonserver-log", daemon=True)
        self._reader.start()
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        if self.supervise:
            log = (lambda line: print(f"saguaro: {line}", file=sys.stderr, flush=True)) if self.echo else self._log.append
            self.supervisor = StubSupervisor(self.http_url, self.proc.pid, log=log, deaths=self.stub_deaths,
                                             admin=self.admin).start()
        return self

    def _read_log(self) -> None:
        # Draining the pipe continuously also keeps a chatty server from blocking on a full pipe.
        assert self.proc is not None and self.proc.stdout is not None
        sink = open(self.log_path, "a", encoding="utf-8") if self.log_path else None
        try:
            for raw in self.proc.stdout:
                line = raw.decode("utf-8", "replace")
                self._log.append(line)
                if sink:
                    sink.write(line)
                    sink.flush()
                if self.echo:
                    sys.stderr.write(line)
        finally:
            if sink:
                sink.close()

    def log_tail(self, n: int = 40) -> str:
        return "".join(list(self._log)[-n:])

    def _relevant_log(self) -> str:
        lines = [ln for ln in self._log if _RELEVANT.search(ln) and not _NOISE.search(ln)]
        return "".join(lines[-25:]) or self.log_tail(25)

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=1) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def load(self, *models: str, timeout_s: float = 300.0) -> None:
        """Loads (or reloads) models through the repository API; needs explicit model control.

        Loading an ensemble also loads the models it is composed of.
        """
        for model in models:
            if self.model_ready(model):
                continue
            try:
                post(self.http_url, f"/v2/repository/models/{model}/load", timeout_s=timeout_s, headers=self.admin)
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", "replace")
                raise SaguaroError(f"tritonserver: model {model!r} failed to load: {detail}\n"
                                   f"{self._relevant_log()}") from None

    def model_ready(self, model: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/models/{model}/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _wait_ready(self, timeout_s: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while not self.is_ready():
            code = self.proc.poll()
            if code is not None:
                if self._reader:
                    self._reader.join(timeout=2)  # collect the last lines the server printed
                raise SaguaroError(f"tritonserver exited with code {code} during startup{self._diagnosis()}:\n"
                                   f"{self._relevant_log()}")
            if time.monotonic() > deadline:
                raise SaguaroError(f"tritonserver: not ready after {timeout_s:.0f} s (models still loading or "
                                   f"failed){self._diagnosis()}; last log lines:\n{self.log_tail()}")
            time.sleep(0.2)

    def _diagnosis(self) -> str:
        # Name the fix for the failures we know.
        log = "".join(self._log)
        if "Address already in use" in log or ("Failed to start" in log and "port" in log):
            return " (a port is already in use: pick free ports or stop the other server)"
        if "failed to load" in log or "UNAVAILABLE" in log:
            return " (a model failed to load: see its error below)"
        if "libpython" in log and "cannot open shared object" in log:
            return " (the Python backend stub cannot find libpython; use a Python with a shared libpython)"
        return ""

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM to the server (it unloads models and ends its stubs), then SIGKILL to its group."""
        if self.proc is None:
            return
        if self.supervisor is not None:        # stubs that exit now are not to be restarted
            self.supervisor.stop()
            self.supervisor = None
        if self.proc.poll() is None:
            self.drain()
        proc, self.proc = self.proc, None
        atexit.unregister(self.stop)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left: the server if stuck, orphaned stubs
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        remove_runtime_dir(proc.pid)           # its secret and sockets
        if self._reader:
            self._reader.join(timeout=2)

    def drain(self, timeout_s: float = 5.0) -> None:
        """Asks `ssd` (when loaded) to stop admitting and end the requests in flight with a
        retryable error, while the server still delivers their responses: after SIGTERM,
        tritonserver 2.51 loses the responses of decoupled requests in flight and never exits."""
        try:
            secret = (server_folder(self.proc.pid) / "secret").read_text()
        except OSError:
            return                             # no model ever started
        if not self.model_ready("ssd"):
            return
        try:
            post(self.http_url, "/v2/models/ssd/generate", json.dumps({"drain": True, "auth": secret}).encode(), timeout_s)
        except (urllib.error.URLError, OSError):
            pass                               # stopping goes on regardless

    def __enter__(self) -> "TritonServer":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
