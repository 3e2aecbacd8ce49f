"""A small same-origin web server for the OHIF viewer over Orthanc's DICOMweb.

It serves OHIF's prebuilt ``dist/`` folder, answers client routes such as ``/viewer`` with
``index.html`` (OHIF is a single-page application), replaces ``app-config.js`` with fpe-node's
configuration, and forwards ``/dicom-web/...`` to Orthanc's DICOMweb root, so the viewer and its
data share one origin (no CORS). It binds to loopback only. It is a test and demo tool.

Run it by hand::

    python deploy/viewer/server.py --dist .cache/ohif-3.13.2/dist --orthanc http://127.0.0.1:8042 --port 3000
"""

from __future__ import annotations

import argparse
import http.client
import mimetypes
import threading
import urllib.parse
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

APP_CONFIG = Path(__file__).resolve().parent / "app-config.js"
PROXIED_PREFIXES = ("/dicom-web/",)
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization"}

mimetypes.add_type("application/wasm", ".wasm")
mimetypes.add_type("text/javascript", ".js")


def _handler_class(dist: Path, orthanc: urllib.parse.SplitResult) -> type[BaseHTTPRequestHandler]:
    dist = dist.resolve()

    class ViewerHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
            return  # quiet: the test output stays readable

        def do_GET(self) -> None:  # noqa: N802 - stdlib name
            path = urllib.parse.urlsplit(self.path).path
            if path.startswith(PROXIED_PREFIXES):
                self._proxy()
            else:
                self._static(path)

        do_HEAD = do_GET

        def do_POST(self) -> None:  # noqa: N802 - stdlib name
            self._proxy()

        def _static(self, path: str) -> None:
            if path.endswith("/app-config.js"):
                self._send_file(APP_CONFIG)
                return
            candidate = (dist / urllib.parse.unquote(path).lstrip("/")).resolve()
            if dist not in candidate.parents and candidate != dist:
                self.send_error(404)
                return
            if candidate.is_file():
                self._send_file(candidate)
            elif "." not in Path(path).name:
                self._send_file(dist / "index.html")  # client route of the single-page app
            else:
                self.send_error(404)

        def _send_file(self, file: Path) -> None:
            body = file.read_bytes()
            ctype = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _proxy(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            conn = http.client.HTTPConnection(orthanc.hostname, orthanc.port, timeout=120)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP | {"host"}}
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                upstream = conn.getresponse()
                data = upstream.read()
            except OSError as exc:
                self.send_error(502, f"Orthanc unreachable: {exc}")
                return
            finally:
                conn.close()
            self.send_response(upstream.status)
            for key, value in upstream.getheaders():
                if key.lower() not in _HOP_BY_HOP | {"content-length"}:
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

    return ViewerHandler


class ViewerServer:
    """OHIF + DICOMweb proxy on ``127.0.0.1:port`` in a background thread."""

    def __init__(self, dist: Path, orthanc_url: str, port: int = 0) -> None:
        if not (dist / "index.html").is_file():
            raise FileNotFoundError(f"{dist} holds no OHIF build (run deploy/viewer/install_ohif.sh)")
        handler = _handler_class(dist, urllib.parse.urlsplit(orthanc_url))
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="viewer-server", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "ViewerServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dist", type=Path, required=True, help="OHIF dist/ folder")
    parser.add_argument("--orthanc", default="http://127.0.0.1:8042", help="Orthanc HTTP root")
    parser.add_argument("--port", type=int, default=3000)
    args = parser.parse_args(argv)
    server = ViewerServer(args.dist, args.orthanc, args.port)
    print(f"OHIF viewer on {server.url}", flush=True)
    try:
        server._httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server._httpd.server_close()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
