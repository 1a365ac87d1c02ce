"""A port that cannot be bound, or a TLS certificate that cannot be used, is a one-line start-up error."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from realtime_qa.services.config import EngineSpec, ServerConfig
from realtime_qa.services.server import QAServer

REPO = Path(__file__).resolve().parents[1]


async def test_port_in_use_is_an_os_error_naming_the_address(engine_dir: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = QAServer(ServerConfig(port=port, engines=(EngineSpec(engine_dir),)))
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            await server.start()
        await server.stop(0)


def make_pair(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}-key.pem", directory / f"{name}-cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return key, cert


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make certificates")
def test_bad_tls_certificates_are_one_line_naming_the_problem(tmp_path: Path) -> None:
    """`qa-serve` with a broken certificate says what is wrong with it (exit 1), not "cannot bind"."""
    key, cert = make_pair(tmp_path, "one")
    other_key, _ = make_pair(tmp_path, "two")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    cases = [
        (garbage, key, f"TLS certificate {garbage} is not a usable PEM certificate chain"),
        (cert, other_key, f"TLS certificate {cert} does not match the key {other_key}"),
        (cert, garbage, f"TLS key {garbage} is not a usable unencrypted PEM private key"),
    ]
    for cert_file, key_file, message in cases:
        result = subprocess.run(
            [sys.executable, "-m", "realtime_qa.services.cli", "--port", "0", "--engine", str(tmp_path / "unused"),
             "--tls-cert", str(cert_file), "--tls-key", str(key_file)],
            capture_output=True, text=True, timeout=120, cwd=REPO,
        )  # fmt: skip
        errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
        assert result.returncode == 1, result.stderr
        assert len(errors) == 1 and message in errors[0], result.stderr
        assert "cannot listen" not in result.stderr and "Traceback" not in result.stderr
