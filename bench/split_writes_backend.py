"""A backend that writes each response head and body in two sends with Nagle on, as Python's
`http.server` does: the body leaves only once the head is ACKed, so a proxy whose kernel delays
that ACK (up to 40 ms on Linux) adds it to every request. Used by the bench's latency-split row.

`python -m bench.split_writes_backend PORT`
"""

from __future__ import annotations

import http.server
import sys

from bench.servers import LARGE_BODY_SIZE, LARGE_PATH, SMALL_BODY, SMALL_PATH


class _SplitWrites(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (the http.server spelling)
        body = {SMALL_PATH: SMALL_BODY, LARGE_PATH: b"x" * LARGE_BODY_SIZE}.get(self.path)  # as the nginx backend
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()  # first send: the head
        self.wfile.write(body)  # second send: the body, held by Nagle until the head's ACK

    def log_message(self, *_: object) -> None:
        pass


if __name__ == "__main__":
    http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), _SplitWrites).serve_forever()
