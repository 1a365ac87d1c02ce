"""Render the repo's nginx configuration for processes started without Docker (tests, benchmarks, bare metal).

    python deploy/nginx/render.py --prefix /tmp/lb --qa-listen 127.0.0.1:8080 \
        --qa-upstream 127.0.0.1:50051 --qa-upstream 127.0.0.1:50052
    nginx -p /tmp/lb -e /tmp/lb/error.log -c /tmp/lb/nginx.conf -g 'daemon off;'

The templates use `${NAME}` placeholders, the syntax the official nginx image substitutes from its
environment in compose; here the same names come from the arguments, and a template line naming an
upstream address is written once per replica. Only the standard library: this file is loaded by path.
"""

from __future__ import annotations

import argparse
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")
UPSTREAM_NAMES = ("QA_UPSTREAM", "ASSISTANT_UPSTREAM")


@dataclass(frozen=True)
class NginxLayout:
    """What to render: where nginx keeps its files, where it listens, and which replicas it balances."""

    prefix: Path
    qa_listen: str = "127.0.0.1:8080"
    qa_upstreams: tuple[str, ...] = ()
    assistant_listen: str | None = None
    assistant_upstreams: tuple[str, ...] = ()
    tls_cert: Path | None = None
    tls_key: Path | None = None
    qa_tls_listen: str | None = None  # with tls_cert/tls_key: TLS termination for qa.v1 on this address
    max_fails: int = 2
    fail_timeout: str = "10s"
    worker_processes: int = 1
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def conf_d(self) -> Path:
        return self.prefix / "conf.d"

    @property
    def main_file(self) -> Path:
        return self.prefix / "nginx.conf"


def substitute(template: str, values: Mapping[str, str]) -> str:
    """Replace `${NAME}` placeholders (nginx's own `$variables` stay); a placeholder without a value is an error."""
    lines: list[str] = []
    for line in template.splitlines(keepends=True):
        names = [name for name in PLACEHOLDER.findall(line) if name in UPSTREAM_NAMES]
        if names and not line.lstrip().startswith("#"):
            (name,) = set(names)
            addresses = values[name].split()
            lines.extend(string.Template(line).substitute({**values, name: address}) for address in addresses)
            continue
        if line.lstrip().startswith("#"):
            lines.append(line)
            continue
        missing = [name for name in PLACEHOLDER.findall(line) if name not in values]
        if missing:
            raise KeyError(f"no value for ${{{missing[0]}}}")
        lines.append(string.Template(line).safe_substitute(values))
    return "".join(lines)


def render(layout: NginxLayout) -> Path:
    """Write nginx.conf and conf.d/ under layout.prefix; returns the main file."""
    if not layout.qa_upstreams and not layout.assistant_upstreams:
        raise ValueError("nothing to balance: give qa and/or assistant upstream addresses")
    layout.conf_d.mkdir(parents=True, exist_ok=True)
    values = {
        "NGINX_PREFIX": str(layout.prefix),
        "NGINX_CONF_D": str(layout.conf_d),
        "NGINX_WORKER_PROCESSES": str(layout.worker_processes),
        "NGINX_ACCESS_LOG": str(layout.prefix / "access.log"),
        "QA_LISTEN": layout.qa_listen,
        "QA_UPSTREAM": " ".join(layout.qa_upstreams),
        "QA_MAX_FAILS": str(layout.max_fails),
        "QA_FAIL_TIMEOUT": layout.fail_timeout,
        "ASSISTANT_LISTEN": layout.assistant_listen or "",
        "ASSISTANT_UPSTREAM": " ".join(layout.assistant_upstreams),
        **layout.extra,
    }
    main = substitute((HERE / "nginx.conf.template").read_text(encoding="utf-8"), values)
    layout.main_file.write_text(main, encoding="utf-8")
    files = ["00-common.conf"]
    if layout.qa_upstreams:
        files.append("qa-grpc.conf")
    if layout.assistant_upstreams:
        if not layout.assistant_listen:
            raise ValueError("assistant upstreams need an assistant listen address")
        files.append("assistant-grpc.conf")
    for name in files:
        text = substitute((TEMPLATES / f"{name}.template").read_text(encoding="utf-8"), values)
        (layout.conf_d / name).write_text(text, encoding="utf-8")
    if layout.tls_cert is not None and layout.tls_key is not None and layout.qa_tls_listen:
        tls_values = {
            "TLS_LISTEN": layout.qa_tls_listen,
            "TLS_CERT": str(layout.tls_cert),
            "TLS_KEY": str(layout.tls_key),
        }
        text = substitute((TEMPLATES / "tls.inc.template").read_text(encoding="utf-8"), tls_values)
        (layout.conf_d / "qa-tls.inc").write_text(text, encoding="utf-8")
    return layout.main_file


def nginx_command(layout: NginxLayout, nginx: str = "nginx") -> list[str]:
    """The command line that runs this layout in the foreground as an ordinary user."""
    prefix = str(layout.prefix)
    return [nginx, "-p", prefix, "-e", f"{prefix}/error.log", "-c", str(layout.main_file), "-g", "daemon off;"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefix", type=Path, required=True, help="directory for nginx.conf, conf.d/, pid, logs")
    parser.add_argument("--qa-listen", default="127.0.0.1:8080")
    parser.add_argument("--qa-upstream", action="append", default=[], metavar="HOST:PORT")
    parser.add_argument("--assistant-listen", default=None)
    parser.add_argument("--assistant-upstream", action="append", default=[], metavar="HOST:PORT")
    parser.add_argument("--tls-cert", type=Path)
    parser.add_argument("--tls-key", type=Path)
    parser.add_argument("--qa-tls-listen", default=None, metavar="HOST:PORT")
    args = parser.parse_args(argv)
    layout = NginxLayout(
        prefix=args.prefix.resolve(),
        qa_listen=args.qa_listen,
        qa_upstreams=tuple(args.qa_upstream),
        assistant_listen=args.assistant_listen,
        assistant_upstreams=tuple(args.assistant_upstream),
        tls_cert=args.tls_cert.resolve() if args.tls_cert else None,
        tls_key=args.tls_key.resolve() if args.tls_key else None,
        qa_tls_listen=args.qa_tls_listen,
    )
    try:
        render(layout)
    except (ValueError, KeyError, OSError) as exc:
        parser.exit(2, f"render.py: error: {exc}\n")
    print(" ".join(nginx_command(layout)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
