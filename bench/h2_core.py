"""`python -m bench.h2_core [--requests N] [--streams S]`: CPU per request of the HTTP/2 server core.

In memory, no TLS, no sockets: an `h2` client sends GET requests in batches of S concurrent
streams on one connection; the server core (`proxy.http2.Http2Server`) turns them into events and
answers each with a small response (head + 2-byte body). Only the server side is timed
(`time.process_time_ns` around its calls: receive, send_head, send_data, outgoing), so the figure
is what the core adds to a request in the proxy, before TLS, routing and the backend hop. For
scale, the same is measured for the HTTP/1.1 framing the proxy uses today (llhttp parse of a
request of the same size + `client_response_head`). What limits it: the Python interpreter (h2
and hpack are pure Python); one core, the best of `--rounds` runs.
"""

from __future__ import annotations

import argparse
import time

import h2.config
import h2.connection
import h2.events

from proxy.http1 import RequestParser, ResponseHead, client_response_head
from proxy.http2 import Http2Server, StreamRequest

REQUEST = [
    (b":method", b"GET"),
    (b":scheme", b"https"),
    (b":path", b"/api/users?page=2"),
    (b":authority", b"site.test"),
    (b"user-agent", b"bench/1.0"),
    (b"accept", b"*/*"),
]
RESPONSE = ((b"content-type", b"text/plain"), (b"content-length", b"2"))


def h2_server_ns_per_request(requests: int, streams: int) -> float:
    server = Http2Server()
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    clock = time.process_time_ns
    spent = 0
    start = clock()
    server.initiate()
    spent += clock() - start
    client.initiate_connection()
    done = 0
    while done < requests:
        batch = min(streams, requests - done)
        for _ in range(batch):
            client.send_headers(client.get_next_available_stream_id(), REQUEST, end_stream=True)
        wire = client.data_to_send()
        start = clock()
        for event in server.receive(wire):
            if isinstance(event, StreamRequest):
                server.send_head(event.stream_id, 200, RESPONSE)
                server.send_data(event.stream_id, b"ok", end_stream=True)
        reply = server.outgoing()
        spent += clock() - start
        ended = sum(isinstance(event, h2.events.StreamEnded) for event in client.receive_data(reply))
        assert ended == batch, f"{ended} of {batch} responses arrived"
        done += batch
    assert server.open_streams == 0
    return spent / requests


def h1_ns_per_request(requests: int) -> float:
    wire = b"GET /api/users?page=2 HTTP/1.1\r\nHost: site.test\r\nUser-Agent: bench/1.0\r\nAccept: */*\r\n\r\n"
    response = ResponseHead(200, b"OK", "1.1", RESPONSE, True, False, 2, True)
    parser = RequestParser()
    clock = time.process_time_ns
    start = clock()
    for _ in range(requests):
        parser.feed(wire)
        parser.events.clear()
        client_response_head(response, rechunk=False, keep_alive=True, date=b"D", extra=b"")
    return (clock() - start) / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--streams", type=int, default=10, help="concurrent streams per batch")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rows = [
        ("h2 core, 1 stream at a time", lambda: h2_server_ns_per_request(args.requests, 1)),
        (f"h2 core, {args.streams} streams per batch", lambda: h2_server_ns_per_request(args.requests, args.streams)),
        ("h1 framing (reference)", lambda: h1_ns_per_request(args.requests)),
    ]
    print(f"{'row':<36} {'µs CPU/request':>15}   (best of {args.rounds}, {args.requests} requests)")
    for name, run in rows:
        best = min(run() for _ in range(args.rounds))
        print(f"{name:<36} {best / 1000:>15.1f}")


if __name__ == "__main__":
    main()
