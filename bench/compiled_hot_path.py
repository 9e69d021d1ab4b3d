"""`python -m bench.compiled_hot_path [--requests N] [--rounds R]`: what the compiled twins save.

In memory, one core, no sockets: the per-request work the optional extension replaces, timed
through the public functions the proxy calls, pure and compiled interleaved round by round (the
machine's load hits both alike), best of the rounds:

- TLS: one keep-alive request's records through `ServerTls` (TLS 1.3, AES-GCM): `receive` of a
  68-byte request record, `send` of a 63-byte response, `outgoing`. The request records are made
  beforehand by a pyOpenSSL client and not timed.
- Heads: `upstream_request_head` for a wrk-like request plus `client_response_head` for an
  nginx-like response (Server, Date, Content-Type, Content-Length, Connection: keep-alive).

What limits it: libssl's own AES-GCM and record work (the same in both), the Python calls into
the methods that remain (the state machine), and allocating the bytes returned.
"""

from __future__ import annotations

import argparse
import time

import trustme
from OpenSSL import SSL, crypto

import proxy.tls
from proxy import http1
from proxy.tls import ServerTls, TlsState
from proxy.tls import pump as pumps

REQUEST = b"GET /index.html HTTP/1.1\r\nHost: example.test\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Wed, 02 Dec 2026 00:00:00 GMT\r\nContent-Length: 2\r\n\r\nok"
BACKEND_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Wed, 02 Dec 2026 00:00:00 GMT\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 2\r\nConnection: keep-alive\r\n\r\nok"
)
DATE = b"Wed, 02 Dec 2026 00:00:00 GMT"


def _pending(connection: SSL.Connection) -> bytes:
    try:
        return connection.bio_read(1 << 20)
    except SSL.WantReadError:
        return b""


def _server_context() -> SSL.Context:
    issued = trustme.CA().issue_cert("bench.test", key_type=trustme.KeyType.ECDSA)
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.use_certificate(crypto.load_certificate(crypto.FILETYPE_PEM, issued.cert_chain_pems[0].bytes()))
    context.use_privatekey(crypto.load_privatekey(crypto.FILETYPE_PEM, issued.private_key_pem.bytes()))
    return context


def tls_ns_per_request(context: SSL.Context, factory: object, requests: int) -> float:
    saved = proxy.tls.new_pump
    proxy.tls.new_pump = factory  # type: ignore[assignment]
    try:
        server = ServerTls(context)
    finally:
        proxy.tls.new_pump = saved
    client = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
    client.set_connect_state()
    for _ in range(10):
        try:
            client.do_handshake()
        except SSL.WantReadError:
            pass
        if flight := _pending(client):
            server.receive(flight)
        if flight := server.outgoing():
            client.bio_write(flight)
    assert server.state is TlsState.OPEN
    records = []
    for _ in range(requests):
        client.send(REQUEST)
        records.append(_pending(client))
    clock = time.process_time_ns
    started = clock()
    for record in records:
        server.receive(record)
        server.send(RESPONSE)
        server.outgoing()
    return (clock() - started) / requests


def heads_ns_per_request(request_head: object, response_head: object, requests: int) -> float:
    parser = http1.RequestParser()
    parser.feed(REQUEST)
    head = parser.events[0]
    response_parser = http1.ResponseParser(b"GET")
    response_parser.feed(BACKEND_RESPONSE)
    response = response_parser.events[0]
    clock = time.process_time_ns
    started = clock()
    for _ in range(requests):
        request_head(head, b"127.0.0.1", b"https", b"127.0.0.1:8443")  # type: ignore[operator]
        response_head(response, False, True, DATE, b"")  # type: ignore[operator]
    return (clock() - started) / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    arguments = parser.parse_args()
    if not pumps.COMPILED or http1._compiled_heads is None:
        raise SystemExit("the compiled hot path is not in use here (make install; INGRESS_PROXY_PURE unset)")
    context = _server_context()
    variants = {
        "pure": (pumps.pure_pump, http1.pure_upstream_request_head, http1.pure_client_response_head),
        "compiled": (pumps.compiled_pump, http1.upstream_request_head, http1.client_response_head),
    }
    best: dict[tuple[str, str], float] = {}
    for _ in range(arguments.rounds):
        for name, (factory, request_head, response_head) in variants.items():
            for part, spent in (
                ("tls", tls_ns_per_request(context, factory, arguments.requests)),
                ("heads", heads_ns_per_request(request_head, response_head, arguments.requests)),
            ):
                best[name, part] = min(best.get((name, part), spent), spent)
    print("| per keep-alive request | pure | compiled | saved |")
    print("|---|---:|---:|---:|")
    for part, label in (("tls", "TLS receive + send + outgoing"), ("heads", "request + response head")):
        pure, compiled = best["pure", part] / 1000, best["compiled", part] / 1000
        print(f"| {label} | {pure:.2f} µs | {compiled:.2f} µs | {pure - compiled:.2f} µs |")
    total_pure = (best["pure", "tls"] + best["pure", "heads"]) / 1000
    total_compiled = (best["compiled", "tls"] + best["compiled", "heads"]) / 1000
    print(f"| together | {total_pure:.2f} µs | {total_compiled:.2f} µs | {total_pure - total_compiled:.2f} µs |")


if __name__ == "__main__":
    main()
