"""Blocking socket clients that send exact bytes and measure how and when the proxy answers."""

from __future__ import annotations

import re
import socket
import ssl
import time
from dataclasses import dataclass

from tests.hostile.proxy_process import LOOPBACK

SERVER_NAME = "hostile.test"

@dataclass(frozen=True)
class Exchange:
    received: bytes
    closed: bool  # the proxy closed (FIN or RST) before the client gave up
    seconds: float  # from the last byte sent to close (or to giving up)

    @property
    def statuses(self) -> list[int]:
        """Status of each complete response received, in order (Content-Length or chunked bodies)."""
        return [status for status, _ in split_responses(self.received)]


def split_responses(data: bytes) -> list[tuple[int, bytes]]:
    responses = []
    while data.startswith(b"HTTP/1.1 ") and (head_end := data.find(b"\r\n\r\n")) != -1:
        head, data = data[:head_end], data[head_end + 4 :]
        status = int(head[9:12])
        length = re.search(rb"\r\ncontent-length: *(\d+)", head, re.I)
        if length is not None:
            body, data = data[: int(length.group(1))], data[int(length.group(1)) :]
        elif re.search(rb"\r\ntransfer-encoding: *chunked", head, re.I):
            body = b""
            while (line_end := data.find(b"\r\n")) != -1:
                size = int(data[:line_end].split(b";")[0], 16)
                body += data[line_end + 2 : line_end + 2 + size]
                data = data[line_end + 4 + size :]
                if size == 0:
                    break
        else:
            body = b""
        responses.append((status, body))
    return responses


def connect(port: int, tls: ssl.SSLContext | None = None) -> socket.socket:
    raw = socket.create_connection((LOOPBACK, port), timeout=5)
    if tls is None:
        return raw
    return tls.wrap_socket(raw, server_hostname=SERVER_NAME)


def read_until_closed(sock: socket.socket, wait: float) -> tuple[bytes, bool]:
    """Everything the peer sends until it closes (True) or `wait` seconds pass (False)."""
    deadline = time.monotonic() + wait
    received = b""
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            piece = sock.recv(65536)
        except TimeoutError:
            return received, False
        except (ConnectionResetError, ssl.SSLError):
            return received, True
        if not piece:
            return received, True
        received += piece
    return received, False


def exchange(port: int, *pieces: bytes, wait: float = 5.0, pause: float = 0.0, tls: ssl.SSLContext | None = None) -> Exchange:
    """Send `pieces` (sleeping `pause` between them), then read until the proxy closes or `wait` passes."""
    with connect(port, tls) as sock:
        for index, piece in enumerate(pieces):
            if index and pause:
                time.sleep(pause)
            try:
                sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                break
        started = time.monotonic()
        received, closed = read_until_closed(sock, wait)
        return Exchange(received, closed, time.monotonic() - started)
