"""An HTTPS proxy on loopback that lets TensorFlow's gs:// file system reach fake-gcs-server.

TensorFlow has no endpoint setting for GCS: it always asks https://storage.googleapis.com and
https://www.googleapis.com. With `https_proxy` pointing here and `CURL_CA_BUNDLE` at the test
CA, its curl sends CONNECT to this process, which terminates TLS with a certificate from that CA
and forwards each request as plain HTTP to the emulator on 127.0.0.1. Nothing leaves loopback:
whatever host TensorFlow names, the request goes to the emulator.

The fixes each request needs (../shared/FINDINGS.md "Cloud storage"): drop
`Transfer-Encoding: identity` (the emulator answers 501); drop a `Host: www.googleapis.com`
header (else the emulator's resumable-upload URLs point there) but keep
`Host: storage.googleapis.com` (media reads need it); answer `GET .../storageLayout` here (the
emulator has no such endpoint; TensorFlow asks for it before renaming a directory).

Runs as its own process (as a thread inside a test process it deadlocked under TFDS writes):

    python tests/gcs_proxy.py --port P --upstream 127.0.0.1:Q --cert C --key K
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import json
import re
import socketserver
import ssl

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}
_LAYOUT = re.compile(r"^/storage/v1/b/([^/?]+)/storageLayout")


def _read_chunked(rfile) -> bytes:
    body = b""
    while True:
        size = int(rfile.readline().split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # Trailers.
            return body
        body += rfile.read(size)
        rfile.readline()


class _Forward(http.server.BaseHTTPRequestHandler):
    """Serves the requests of one TLS connection by forwarding them to the emulator."""

    protocol_version = "HTTP/1.1"
    upstream = ("127.0.0.1", 0)

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature.
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return _read_chunked(self.rfile)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _forward(self) -> None:
        body = self._body()
        layout = _LAYOUT.match(self.path)
        if self.command == "GET" and layout:
            payload = {
                "kind": "storage#storageLayout",
                "bucket": layout.group(1),
                "location": "US",
                "locationType": "multi-region",
                "hierarchicalNamespace": {"enabled": False},
            }
            self._reply(200, [("Content-Type", "application/json")], json.dumps(payload).encode())
            return
        headers = {}
        for name, value in self.headers.items():
            lower = name.lower()
            if lower in _HOP_BY_HOP or lower == "content-length":
                continue
            if lower == "host" and value.split(":")[0] != "storage.googleapis.com":
                continue
            headers[name] = value
        if body or self.command in ("POST", "PUT", "PATCH"):
            headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            conn.putrequest(self.command, self.path, skip_host="Host" in headers)
            for name, value in headers.items():
                conn.putheader(name, value)
            conn.endheaders(body or None)
            response = conn.getresponse()
            data = response.read()
            kept = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]
            kept = [(k, v) for k, v in kept if k.lower() != "content-length"]
            self._reply(response.status, kept, data)
        finally:
            conn.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = do_HEAD = _forward


class _Connect(http.server.BaseHTTPRequestHandler):
    """Accepts CONNECT, then speaks TLS as whatever host the client asked for."""

    protocol_version = "HTTP/1.1"
    tls: ssl.SSLContext

    def log_message(self, format, *args):  # noqa: A002
        pass

    def do_CONNECT(self):  # noqa: N802 - http.server's naming.
        self.send_response(200, "Connection established")
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        try:
            conn = self.tls.wrap_socket(self.connection, server_side=True)
        except (ssl.SSLError, OSError):
            return
        try:
            _Forward(conn, self.client_address, self.server)
        except (ssl.SSLError, OSError):
            pass


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def main() -> None:
    """Parses the flags and serves until killed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="host:port of the emulator (http)")
    parser.add_argument("--cert", required=True, help="PEM certificate chain for *.googleapis.com")
    parser.add_argument("--key", required=True, help="PEM private key of that certificate")
    args = parser.parse_args()
    host, port = args.upstream.rsplit(":", 1)
    _Forward.upstream = (host, int(port))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    _Connect.tls = context
    server = _Server(("127.0.0.1", args.port), _Connect)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
