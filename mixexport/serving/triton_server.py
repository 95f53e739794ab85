"""Start and stop a local ``tritonserver``: the binary in the ``nvidia-pytriton`` wheel
(``pip install -e ".[triton]"``), for tests, load runs and trying a repository on one machine.

That wheel ships the server (``pytriton/tritonserver/bin``), its shared libraries
(``nvidia_pytriton.libs``), the python backend only (no ONNX Runtime or TensorRT backend) and one
python-backend stub per Python version. As pytriton itself does, the stub matching this interpreter
is copied beside ``libtriton_python.so`` in a backend directory assembled in a temporary directory
(site-packages is never modified), the libraries go on ``LD_LIBRARY_PATH``, and this interpreter's
``bin`` goes first on ``PATH`` (the stub's embedded Python takes its environment from the ``python3``
found there, so model.py imports what this environment has). Every address is 127.0.0.1 by default.
The server runs in its own process group; :meth:`TritonServer.stop` (also on ``with`` exit) sends it
SIGINT, then SIGKILL to the whole group after ``stop_timeout_s``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence

from mixexport.errors import EnvironmentUnavailableError, MixexportError


class ServerStartError(MixexportError):
    """tritonserver exited or did not become ready; the message holds the end of its log."""

    exit_code = 3


def distribution() -> Path:
    """pytriton's ``tritonserver`` directory, or :class:`EnvironmentUnavailableError`."""
    try:
        import pytriton
    except ImportError as e:
        raise EnvironmentUnavailableError("tritonserver is not installed (the nvidia-pytriton wheel ships it)",
                                          'pip install -e ".[triton]"') from e
    root = Path(pytriton.__file__).parent / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise EnvironmentUnavailableError(f"no tritonserver binary under {root}", "reinstall nvidia-pytriton==0.7.0")
    return root


def unavailable_reason() -> str | None:
    """None when a local tritonserver can be started here, else why not."""
    try:
        root = distribution()
    except EnvironmentUnavailableError as e:
        return e.message
    stub = root / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}"
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if not (stub / "triton_python_backend_stub").is_file():
        return f"pytriton has no python-backend stub for Python {version}"
    import ctypes.util

    if ctypes.util.find_library(f"python{version}") is None:  # the stub links the shared libpython
        return f"the python-backend stub needs the shared library libpython{version}.so, not found here"
    return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class TritonServer:
    """``with TritonServer(repo) as server: server.http_url …`` — a tritonserver on loopback serving one
    or more model repositories."""

    def __init__(self, repository: str | Path | Sequence[str | Path], host: str = "127.0.0.1",
                 start_timeout_s: float = 120.0, stop_timeout_s: float = 20.0, extra_args: tuple[str, ...] = ()) -> None:
        self.repositories = [Path(r) for r in ([repository] if isinstance(repository, (str, Path)) else repository)]
        self.host = host
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.extra_args = extra_args
        self.http_port = self.grpc_port = self.metrics_port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.workdir: Path | None = None

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def log_path(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "tritonserver.log"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except (OSError, AssertionError):
            return ""

    def start(self) -> TritonServer:
        root = distribution()
        version = f"{sys.version_info[0]}.{sys.version_info[1]}"
        stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise EnvironmentUnavailableError(f"pytriton has no python-backend stub for Python {version}",
                                              "use a Python version the nvidia-pytriton wheel ships a stub for")
        self.workdir = Path(tempfile.mkdtemp(prefix="mixexport-triton-"))
        backend = self.workdir / "backends" / "python"
        backend.mkdir(parents=True)
        for f in (root / "backends" / "python").iterdir():
            if f.is_file():
                shutil.copy2(f, backend / f.name)
        shutil.copy2(stub, backend / "triton_python_backend_stub")
        self.http_port, self.grpc_port, self.metrics_port = (free_port(self.host) for _ in range(3))
        libs = Path(root).parent.parent / "nvidia_pytriton.libs"
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = ":".join(p for p in (env.get("LD_LIBRARY_PATH"), str(libs),
                                                       str(root / "external_libs")) if p)
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        cmd = [str(root / "bin" / "tritonserver"), *(f"--model-repository={r.resolve()}" for r in self.repositories),
               f"--backend-directory={self.workdir / 'backends'}", f"--cache-directory={root / 'caches'}",
               f"--http-address={self.host}", f"--http-port={self.http_port}",
               f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
               f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
               "--allow-metrics=true", "--allow-gpu-metrics=false", "--exit-on-error=true",
               # an open client connection holds a stopping server for its whole exit timeout (30 s)
               f"--exit-timeout-secs={max(1, int(self.stop_timeout_s) // 2)}",
               f"--backend-config=python,shm-region-prefix-name=mixexport{os.getpid()}x{self.http_port}",
               *self.extra_args]
        log = open(self.log_path, "wb")  # noqa: SIM115 - the child writes it; closed in stop()
        self._log = log
        self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)  # its own group: stop() kills it all
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.start_timeout_s
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerStartError(f"tritonserver exited with code {self.process.returncode} while starting; "
                                       f"its log ends:\n{self.log_tail()}", "see the log above")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        raise ServerStartError(f"tritonserver was not ready after {self.start_timeout_s:.0f} s; its log ends:\n"
                               f"{self.log_tail()}", "see the log above")

    def stop(self) -> int | None:
        """Stop the server (SIGINT, then SIGKILL to its process group); idempotent. Its exit code."""
        code = None
        if self.process is not None:
            try:
                if self.process.poll() is None:
                    self.process.send_signal(signal.SIGINT)  # the server alone: it stops its stubs itself
                    try:
                        self.process.wait(timeout=self.stop_timeout_s)
                    except subprocess.TimeoutExpired:
                        os.killpg(self.process.pid, signal.SIGKILL)
                        self.process.wait(timeout=self.stop_timeout_s)
                code = self.process.returncode
            finally:
                try:  # stubs left behind in the group (the server gone): none may outlive the test
                    os.killpg(self.process.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                self._log.close()
                self.process = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
        return code

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
