"""In-memory TLS for unit tests: a pyOpenSSL client on memory BIOs pumped against our `ServerTls`,
no sockets (the sans-IO state machine tested as proxy/tls's theory says)."""

from __future__ import annotations

from OpenSSL import SSL

from proxy.tls import ServerTls, TlsState


def pending(connection: SSL.Connection) -> bytes:
    """What a pyOpenSSL peer has written to its outgoing BIO (b"" if nothing)."""
    try:
        return connection.bio_read(1 << 22)
    except SSL.WantReadError:
        return b""


def handshake(server: ServerTls, client: SSL.Connection) -> None:
    """Pump flights both ways until the server is OPEN and nothing is left to send. Raises the
    server's TlsFailure (its alert, if any, delivered to the client first) or the client's SSL.Error."""
    for _ in range(10):
        try:
            client.do_handshake()
        except SSL.WantReadError:
            pass
        to_server = pending(client)
        try:
            if to_server:
                server.receive(to_server)
        finally:
            to_client = server.outgoing()
            if to_client:
                client.bio_write(to_client)  # the alert too, when the server broke off
        if server.state is TlsState.OPEN and not to_server and not to_client:
            return
    raise AssertionError(f"handshake did not finish: {server.state}")
