"""Real processes for the deployment tests: qa-serve replicas, redis-server, nginx, prometheus, a throwaway CA.

Everything listens on 127.0.0.1 only, lives in the test's temporary directory, and is stopped by the
caller (`stop_all`). Waits poll observable state (a log line, a port, a health check) with a timeout.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LISTENING = re.compile(r"listening on (\S+):(\d+)")
METRICS = re.compile(r"metrics on http://(\S+):(\d+)/metrics")
START_TIMEOUT_S = 120.0  # a replica loads the CPU engine: seconds on a quiet machine, more on a loaded one


def free_port() -> int:
    """A port free right now on loopback (for programs that cannot take port 0: redis, nginx, prometheus)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    port: int = 0
    metrics_port: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def wait_log(self, pattern: re.Pattern[str], timeout_s: float) -> re.Match[str]:
        def found() -> re.Match[str] | None:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.log_text()[-3000:]}")
            return pattern.search(self.log_text())

        match: re.Match[str] = wait_for(found, timeout_s, f"{self.name}: {pattern.pattern}")
        return match

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        return int(self.popen.returncode)


def spawn(name: str, argv: Sequence[str], directory: Path, env: dict[str, str] | None = None) -> Process:
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / f"{name}.log"
    with log_path.open("wb") as log_file:
        popen = subprocess.Popen(
            list(argv), stdout=log_file, stderr=subprocess.STDOUT, cwd=directory, env={**os.environ, **(env or {})}
        )
    return Process(name, popen, log_path)


def start_replica(
    name: str, directory: Path, engine_dir: Path, *args: str, env: dict[str, str] | None = None
) -> Process:
    """`qa-serve` on a free port with a metrics endpoint; returns once it listens (models may still load)."""
    argv = [str(BIN / "qa-serve"), "--port", "0", "--metrics-port", "0", "--engine", str(engine_dir),
            "--max-batch-size", "1", "--grace-s", "2", *args]  # fmt: skip
    process = spawn(name, argv, directory, env)
    process.port = int(process.wait_log(LISTENING, START_TIMEOUT_S).group(2))
    process.metrics_port = int(process.wait_log(METRICS, START_TIMEOUT_S).group(2))
    return process


def wait_serving(processes: Sequence[Process], timeout_s: float = START_TIMEOUT_S) -> None:
    """Until each replica logs that its models are loaded ("serving ...")."""
    for process in processes:
        process.wait_log(re.compile(r"serving .* after"), timeout_s)


def start_redis(directory: Path, maxmemory: str = "64mb") -> Process:
    """redis-server on a free loopback port, no persistence, bounded memory evicting least recently used keys."""
    port = free_port()
    argv = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--dir", str(directory), "--save", "",
            "--appendonly", "no", "--maxmemory", maxmemory, "--maxmemory-policy", "allkeys-lru"]  # fmt: skip
    process = spawn("redis", argv, directory)
    process.port = port
    wait_for(lambda: port_open(port), 20, "redis-server")
    return process


def load_nginx_renderer() -> ModuleType:
    """deploy/nginx/render.py (deploy/ is not a package: load the file)."""
    spec = importlib.util.spec_from_file_location("deploy_nginx_render", REPO / "deploy" / "nginx" / "render.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def start_nginx(directory: Path, qa_upstreams: Sequence[str], **layout: Any) -> Process:
    """Debian's nginx with the repo's configuration, rendered for these upstreams, in the foreground."""
    render = load_nginx_renderer()
    port = free_port()
    config = render.NginxLayout(
        prefix=directory, qa_listen=f"127.0.0.1:{port}", qa_upstreams=tuple(qa_upstreams), **layout
    )
    render.render(config)
    process = spawn("nginx", render.nginx_command(config, shutil.which("nginx") or "nginx"), directory)
    process.port = port
    wait_for(lambda: port_open(port), 20, "nginx")
    return process


def stop_all(processes: Sequence[Process | None]) -> None:
    for process in processes:
        if process is not None:
            process.stop()


@contextlib.contextmanager
def processes() -> Iterator[list[Process]]:
    """A list the test appends its processes to; all are stopped at the end, whatever happens."""
    started: list[Process] = []
    try:
        yield started
    finally:
        stop_all(list(reversed(started)))


# -- a throwaway certificate authority (openssl CLI) ----------------------------------------------


@dataclass(frozen=True)
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca(directory: Path, name: str) -> Certificates:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate (CN=`name`-client)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca = directory / "ca.key", directory / "ca.pem"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name} test CA",
             "-keyout", str(ca_key), "-out", str(ca))  # fmt: skip
    paths = {}
    for role, subject, ext in (
        ("server", "/CN=localhost", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"),
        ("client", f"/CN={name}-client", "extendedKeyUsage=clientAuth"),
    ):
        key, csr, cert = directory / f"{role}.key", directory / f"{role}.csr", directory / f"{role}.pem"
        ext_file = directory / f"{role}.ext"
        ext_file.write_text(ext + "\n", encoding="utf-8")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout", str(key), "-out", str(csr))
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
                 "-days", "1", "-extfile", str(ext_file), "-out", str(cert))  # fmt: skip
        paths[role] = (cert, key)
    return Certificates(ca, paths["server"][0], paths["server"][1], paths["client"][0], paths["client"][1])


def scrape(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode("utf-8"))


def sample_sum(metrics_text: str, name: str, **labels: str) -> float:
    """The sum of every sample `name{labels...}` in a Prometheus text exposition."""
    total = 0.0
    for line in metrics_text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{key}="{val}"' in head for key, val in labels.items()):
            total += float(value)
    return total
