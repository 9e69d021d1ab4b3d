"""Differential fuzzing over the wire: mutated requests go to the real proxy, and what the backend
then receives must be exactly what the proxy's own parser made of the input — the same requests,
in order, with the same bodies — never an extra request (smuggling by re-serialisation) and never
one the parser refused. The client gets only well-formed responses, then a close."""

from __future__ import annotations

import socket
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.hostile.clients import split_responses
from tests.hostile.proxy_process import LOOPBACK
from tests.hostile.test_parser_fuzz import mutated_requests, parse, valid_requests

WIRE_EXAMPLES = max(settings().max_examples // 5, 40)  # a fifth of the profile's: each is a round trip


def send_and_half_close(port: int, data: bytes) -> bytes:
    with socket.create_connection((LOOPBACK, port), timeout=5) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)  # the proxy answers what it parsed, then closes
        received = b""
        try:
            while piece := sock.recv(65536):
                received += piece
        except ConnectionResetError:
            pass
        return received


@settings(max_examples=WIRE_EXAMPLES)
@given(st.one_of(valid_requests(), mutated_requests()))
def test_backend_receives_exactly_what_the_parser_accepted(hostile_proxy, zoo, data: bytes) -> None:
    zoo.app.received.clear()
    events, refused = parse([data])
    complete: list[tuple[bytes, int]] = []  # (method, body length) of each whole request
    method, body_length = b"", 0
    for event in events:
        if event[0] == "head":
            assert isinstance(event[1], bytes)
            method, body_length = event[1], 0
        elif event[0] == "Body":
            assert isinstance(event[1], bytes)
            body_length += len(event[1])
        elif event[0] == "end":
            complete.append((method, body_length))
    answer = send_and_half_close(hostile_proxy.ports.http, data)
    time.sleep(0.01)
    forwarded = [(seen["method"].encode(), seen["body_length"]) for seen in zoo.app.received]
    assert len(forwarded) <= len(complete)
    for sent, expected in zip(forwarded, complete):  # targets: aiohttp normalises them ("/?" → "/")
        assert sent == expected
    statuses = [status for status, _ in split_responses(answer)]
    assert all(100 <= status <= 599 for status in statuses)
    if refused is not None and not complete:
        assert forwarded == [] and statuses[-1:] in ([refused], [])
