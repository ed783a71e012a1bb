"""A loopback HTTP proxy in front of an S3 endpoint that fails some requests the way real storage does.

Of every `period` requests, one is answered 503 SlowDown, one has its connection closed
before any response, and (for object reads) one gets the headers and half the body before
the connection drops. Use as `with closing(FaultProxy(endpoint)) as proxy:` and point
AWS_ENDPOINT_URL at `proxy.url`.
"""

from __future__ import annotations

import http.client
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection", "upgrade"}
SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class FaultProxy:
    def __init__(self, upstream: str, period: int = 10) -> None:
        self.upstream = urlsplit(upstream)
        self.period = period
        self.faults: Counter[str] = Counter()
        self.requests = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _fault_for(self, is_object_read: bool) -> str | None:
        with self._lock:
            self.requests += 1
            position = self.requests % self.period
        fault = {2: "slow_down", 5: "dropped", 8: "cut_body" if is_object_read else "dropped"}.get(position)
        if fault:
            with self._lock:
                self.faults[fault] += 1
        return fault

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                path = self.path.partition("?")[0].strip("/")
                object_read = self.command == "GET" and "/" in path  # path style: /bucket/key
                fault = proxy._fault_for(object_read)
                if fault == "slow_down":
                    self._respond(503, [("Content-Type", "application/xml")], SLOW_DOWN)
                    return
                if fault == "dropped":
                    self.close_connection = True
                    return
                upstream = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                try:
                    upstream.request(self.command, self.path, body=body or None, headers=dict(self.headers.items()))
                    response = upstream.getresponse()
                    content = response.read()
                    headers = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP]
                finally:
                    upstream.close()
                if fault == "cut_body" and len(content) > 1:
                    self._respond(response.status, headers, content, send=len(content) // 2)
                    self.close_connection = True
                    return
                self._respond(response.status, headers, content)

            def _respond(self, status: int, headers: list[tuple[str, str]], content: bytes, send: int | None = None):
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(content[:send])
                self.wfile.flush()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        return Handler
