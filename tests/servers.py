"""Real servers on 127.0.0.1, started by the tests and benchmarks and stopped by pid.

One place for what every test or benchmark that needs a peer server does: a
free loopback port, nginx with its own configuration and scratch directory,
waiting until the port accepts connections, and stopping the process (SIGTERM,
then SIGKILL) whatever happens in between.  The benchmarks import it too, so a
benchmark's nginx is configured the way the tests' nginx is.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

__all__ = ("free_port", "nginx_command", "running")

_NGINX_CONF = """\
{user}
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    types {{ text/plain txt; }}
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        autoindex on;
    }}
}}
"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def nginx_command(conf_dir: Path, root: Path, port: int, *, workers: int = 1) -> list[str]:
    """nginx serving ``root`` on ``port`` in the foreground, with its own
    configuration, logs and scratch files in ``conf_dir`` (created)."""
    conf_dir.mkdir(parents=True, exist_ok=True)
    # As root, nginx's workers would run as nobody, who cannot enter a 0700
    # temp dir (pytest's tmp_path, a benchmark's scratch directory).
    user = "user root root;" if os.geteuid() == 0 else ""
    conf = _NGINX_CONF.format(user=user, dir=conf_dir, port=port, root=root)
    (conf_dir / "nginx.conf").write_text(conf)
    return [
        "nginx", "-p", str(conf_dir), "-c", str(conf_dir / "nginx.conf"),
        "-g", f"daemon off; master_process on; worker_processes {workers};",
    ]  # fmt: skip


@contextmanager
def running(
    command: list[str],
    port: int,
    log: Path,
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``command`` (its output appended to ``log``) until the block ends,
    from the moment ``port`` accepts connections; stopped by its pid even when
    the block fails.  A server that exits or stays closed for 30 s is an error
    that quotes its log."""
    with open(log, "a") as out:
        proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start: {log.read_text()}") from None
                time.sleep(0.02)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
