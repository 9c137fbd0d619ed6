"""Real servers on 127.0.0.1 for the remote-shard tests, started and stopped by the tests.

ShardServer   a folder over HTTP with Range support, counting the body bytes it sends
FaultProxy    forwards GETs to an upstream (ShardServer or moto), injecting faults on a fixed schedule
MotoServer    moto's standalone S3 server as a subprocess on a free port
"""

from __future__ import annotations

import http.client
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

from pretrain.ports import free_port


def relay_headers(handler: BaseHTTPRequestHandler, r: http.client.HTTPResponse, length: int) -> None:
    """Send the status and headers of upstream response `r` through `handler` (hop-by-hop ones dropped, the
    length of the body the proxy will write)."""
    handler.send_response(r.status)
    for k, v in r.getheaders():
        if k.lower() not in ("connection", "transfer-encoding", "content-length", "date", "server"):
            handler.send_header(k, v)
    handler.send_header("Content-Length", str(length))
    handler.end_headers()


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:  # a client that hung up (a timeout, a reset) is normal
        pass


class _Server:
    """A ThreadingHTTPServer on 127.0.0.1 in a daemon thread; a context manager that stops it."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]):
        self.httpd = _QuietServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.lock = threading.Lock()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


class _Quiet(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else every small response waits ~40 ms for a delayed ACK

    def log_message(self, *args) -> None:  # keep the test output clean
        pass


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """[start, stop) of a `bytes=a-b` / `bytes=a-` header; None for the whole object."""
    if not header or not header.startswith("bytes="):
        return None
    a, _, b = header[len("bytes=") :].partition("-")
    return int(a), min(size, int(b) + 1) if b else size


class ShardServer(_Server):
    """Serves `root` over HTTP/1.1 with Range requests (206 / 416); `served` counts body bytes sent, `log` holds
    (path, start, stop) of every body."""

    def __init__(self, root: Path):
        self.root, self.served, self.requests, self.log = Path(root), 0, 0, []
        super().__init__(_ShardHandler)

    def reset_counts(self) -> None:
        with self.lock:
            self.served, self.requests, self.log = 0, 0, []


class _ShardHandler(_Quiet):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        owner: ShardServer = self.server.owner
        path = owner.root / urlparse(self.path).path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        size = path.stat().st_size
        rng = _parse_range(self.headers.get("Range"), size)
        start, stop = rng or (0, size)
        if rng and start >= size:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
        self.send_header("Content-Length", str(stop - start))
        self.end_headers()
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(stop - start)
        with owner.lock:
            owner.served += len(body)
            owner.requests += 1
            owner.log.append((urlparse(self.path).path, start, start + len(body)))
        self.wfile.write(body)


class FaultProxy(_Server):
    """Forwards GETs to `upstream`; request n (counted over paths ending in `.tar`, from 1) gets `schedule[n]`.

    Faults: "reset" (half the body, then a TCP reset), "503", "stall" (headers, then silence for `stall_s`).
    Paths ending in one of `missing` answer 404 every time. `injected` counts the faults injected.
    """

    def __init__(self, upstream: str, schedule: dict[int, str], missing: tuple[str, ...] = (), stall_s: float = 3.0):
        self.upstream, self.schedule, self.missing, self.stall_s = urlparse(upstream), schedule, missing, stall_s
        self.n, self.injected = 0, 0
        super().__init__(_ProxyHandler)


class _ProxyHandler(_Quiet):
    def do_GET(self) -> None:  # noqa: N802
        p: FaultProxy = self.server.owner
        path = urlparse(self.path).path
        fault = None
        if path.endswith(p.missing) and p.missing:
            self.send_error(404)
            return
        if path.endswith(".tar"):
            with p.lock:
                p.n += 1
                fault = p.schedule.get(p.n)
                p.injected += fault is not None
        if fault == "503":
            self.send_error(503)
            return
        conn = http.client.HTTPConnection(p.upstream.hostname, p.upstream.port, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        conn.request("GET", self.path, headers=headers)
        r = conn.getresponse()
        body = r.read()
        conn.close()
        relay_headers(self, r, len(body))
        if fault == "stall":
            time.sleep(p.stall_s)
            self.close_connection = True
            return
        if fault == "reset":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            # SO_LINGER 0: close sends a RST, as a dropped connection in the middle of a body does
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        self.wfile.write(body)


class MotoServer:
    """moto's standalone S3 server (`moto_server`) on a free loopback port; sets the AWS environment for clients."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.url,
        }

    def __enter__(self):
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"moto server did not start on port {self.port} within 60 s")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def require_known_keys(self, on: bool = True) -> None:
        """`on`: from now on every request must be signed with a key moto's IAM knows (else `InvalidAccessKeyId`, as
        S3 answers an unknown key); off: any key is taken again (moto's default)."""
        import urllib.request

        url, body = f"{self.url}/moto-api/reset-auth", b"0" if on else b"inf"
        req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()

    def upload(self, folder: Path, bucket: str, prefix: str) -> str:
        """Put every file of `folder` under s3://bucket/prefix/; returns that URL."""
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.url, **_creds(self.env))
        s3.create_bucket(Bucket=bucket)
        for f in sorted(Path(folder).iterdir()):
            if f.is_file():
                s3.put_object(Bucket=bucket, Key=f"{prefix}/{f.name}", Body=f.read_bytes())
        return f"s3://{bucket}/{prefix}/"


def _creds(env: dict) -> dict:
    return {
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
        "region_name": env["AWS_DEFAULT_REGION"],
    }


def environ_with(env: dict) -> dict:
    """os.environ plus `env` (for subprocesses)."""
    return {**os.environ, **env}


class UploadProxy(_Server):
    """Forwards every request (GET, HEAD, PUT, POST, DELETE) to `upstream` (moto); each distinct PUT / POST request
    (method, path and query: one object, or one part of a multipart upload) is answered 503 its first
    `fail_each_write` times (its body read, nothing forwarded). `log` holds (method, path?query, status) of every
    request, in order: the multipart uploads are counted from it."""

    def __init__(self, upstream: str, fail_each_write: int = 0):
        self.upstream, self.fail_each_write, self.log = urlparse(upstream), fail_each_write, []
        self.failed: dict[str, int] = {}
        super().__init__(_UploadProxyHandler)

    def parts(self, key_suffix: str = "") -> int:
        """UploadPart requests that went through (answered 200), of keys ending in `key_suffix`."""
        return sum(
            1
            for method, path, status in self.log
            if method == "PUT" and "partNumber=" in path and status == 200 and path.split("?")[0].endswith(key_suffix)
        )


class _UploadProxyHandler(_Quiet):
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self) -> None:
        p: UploadProxy = self.server.owner
        body = self._body() if self.command in ("PUT", "POST", "DELETE") else b""
        request = f"{self.command} {self.path}"
        with p.lock:
            fail = self.command in ("PUT", "POST") and p.failed.get(request, 0) < p.fail_each_write
            p.failed[request] = p.failed.get(request, 0) + fail
        if fail:
            p.log.append((self.command, self.path, 503))
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            return
        skip = ("host", "connection", "expect", "transfer-encoding", "content-length")
        headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
        headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(p.upstream.hostname, p.upstream.port, timeout=60)
        conn.request(self.command, self.path, body=body, headers=headers)
        r = conn.getresponse()
        data = r.read()
        conn.close()
        with p.lock:
            p.log.append((self.command, self.path, r.status))
        relay_headers(self, r, len(data))
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward  # noqa: N815 - http.server's names
