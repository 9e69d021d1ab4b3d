"""HTTP/1.1 framing, sans-IO: bytes in, events out, over the llhttp C parser (httptools).

Theory of operation
-------------------
`RequestParser` (client side) and `ResponseParser` (backend side) are fed raw bytes and append
frozen events to their `events` deque (the connection's own queue, when it passes one in): a head (`RequestHead` / `ResponseHead`), any number of
`Body` pieces (already de-chunked), then `EndOfMessage`. Pipelined requests simply produce the
next head after the previous `EndOfMessage`; the connection shell consumes events in order, so
responses go out in request order. After an accepted Upgrade (or a 101 response), the bytes that
follow are not HTTP: they come out as `TunnelData`.

The parser is strict (llhttp's defaults, no leniencies) and we add the checks llhttp leaves to
the application, each mapped to the status the peer has earned (`PeerError`):
- both Content-Length and Transfer-Encoding, or any Transfer-Encoding but exactly `chunked`
  → 400/501, so no request can be framed two ways (request smuggling);
- several Content-Length values, a missing or repeated Host on HTTP/1.1 → 400;
- an Upgrade request that announces a body → 400: llhttp ends such a request at its head, so the
  body would be read as the tunnel's first bytes;
- a request target that is not origin-form (`/path`) → 400: we are a reverse proxy, not a
  forward proxy, so absolute-, authority- and asterisk-form are refused; CONNECT → 405;
- limits below, each named with its reason.

Bodies are re-framed for the next hop by the shell: a Content-Length body is forwarded with the
same length, a chunked one re-chunked piece by piece (trailers are dropped), so body bytes are
streamed and never held whole.

Framing is ours, never the peer's to remove. Every head we send is re-derived from what this
parser decided, not filtered from the head we received: the framing headers (Content-Length,
Transfer-Encoding), Host and our forwarding headers are never copied from the peer; they are
written from the parsed values. A `Connection` token may therefore drop only headers we would
otherwise copy verbatim; one that names a framing, routing or forwarding header (RFC 9110
§7.6.1 forbids a proxy to let it remove the framing it decided on) is ignored, as HAProxy and
nginx ignore it. So the next hop always frames the message exactly as we did, and a client cannot
turn a body into a second request that never passed routing (request smuggling) nor a backend
make a response run into the next one.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import httptools

from proxy.compiled import load_twin

# Limits, in line with nginx's and HAProxy's defaults.
MAX_TARGET_BYTES = 8 * 1024  # nginx large_client_header_buffers: a longer request line gets 414
MAX_HEADER_BYTES = 32 * 1024  # all header names + values; beyond it 431 (HAProxy tune.bufsize 16k–32k)
MAX_HEADER_COUNT = 100  # HAProxy's default tune.http.maxhdr is 101; beyond it 431
MAX_RESPONSE_HEADER_BYTES = 64 * 1024  # a backend that sends more is broken: 502

HOP_BY_HOP = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade")
)

Headers = tuple[tuple[bytes, bytes], ...]


class PeerError(Exception):
    """The peer sent something we refuse; `status` is what we answer (when we still can)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class RequestHead:
    method: bytes
    target: bytes
    version: str  # "1.0" or "1.1"
    headers: Headers
    host: bytes
    keep_alive: bool
    upgrade: bool  # the client asks to switch protocols (e.g. WebSocket)
    chunked: bool
    content_length: int | None
    # Headers the proxy vouches for, sent upstream after the ones it derives: the client
    # certificate's (proxy/client_auth.py). Clients' own copies of those names are never copied.
    vouched: Headers = ()

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    @property
    def path(self) -> str:
        question = self.target.find(b"?")
        raw = self.target if question == -1 else self.target[:question]
        return raw.decode("latin-1")


@dataclass(frozen=True, slots=True)
class ResponseHead:
    status: int
    reason: bytes
    version: str
    headers: Headers
    keep_alive: bool
    chunked: bool
    content_length: int | None
    has_body: bool  # False for HEAD responses, 1xx, 204 and 304


@dataclass(frozen=True, slots=True)
class Body:
    data: bytes


@dataclass(frozen=True, slots=True)
class EndOfMessage:
    pass


@dataclass(frozen=True, slots=True)
class TunnelData:
    data: bytes


END_OF_MESSAGE = EndOfMessage()
Event = RequestHead | ResponseHead | Body | EndOfMessage | TunnelData


def connection_tokens(headers: Headers) -> frozenset[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(token.strip().lower() for token in value.split(b","))
    return frozenset(tokens)


def _content_length(values: list[bytes]) -> int | None:
    if not values:
        return None
    distinct = {value.strip() for value in values}
    if len(distinct) != 1:
        raise PeerError(400, "conflicting Content-Length values")
    (value,) = distinct
    if not value.isdigit():
        raise PeerError(400, "invalid Content-Length")
    return int(value)


class _ParserBase:
    """Collects the callbacks llhttp makes during `feed_data` into events."""

    def __init__(self, events: deque[Event] | None = None) -> None:
        self.events: deque[Event] = deque() if events is None else events
        self.tunnel = False
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._error: PeerError | None = None

    def on_message_begin(self) -> None:
        self._headers = []
        self._header_bytes = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        self._header_bytes += len(name) + len(value)

    def on_body(self, body: bytes) -> None:
        self.events.append(Body(body))

    def on_message_complete(self) -> None:
        self.events.append(END_OF_MESSAGE)

    def _fail(self, error: PeerError) -> None:
        """Called inside a callback: llhttp wraps exceptions, so keep ours and raise it after."""
        self._error = error
        raise error

    def _framing(self) -> tuple[bool, int | None]:
        lengths: list[bytes] = []
        encodings: list[bytes] = []
        for name, value in self._headers:
            lower = name.lower()
            if lower == b"content-length":
                lengths.append(value)
            elif lower == b"transfer-encoding":
                encodings.append(value)
        content_length = _content_length(lengths)
        if encodings:
            if content_length is not None:
                raise PeerError(400, "both Content-Length and Transfer-Encoding")
            if len(encodings) != 1 or encodings[0].strip().lower() != b"chunked":
                raise PeerError(501, "unsupported Transfer-Encoding")
            return True, None
        return False, content_length


class RequestParser(_ParserBase):
    def __init__(self, events: deque[Event] | None = None) -> None:
        super().__init__(events)
        self._parser = httptools.HttpRequestParser(self)
        self._target = b""

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._target = b""

    def on_url(self, piece: bytes) -> None:
        self._target += piece
        if len(self._target) > MAX_TARGET_BYTES:
            self._fail(PeerError(414, "request target too long"))

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        if self._header_bytes > MAX_HEADER_BYTES or len(self._headers) > MAX_HEADER_COUNT:
            self._fail(PeerError(431, "request headers too large"))

    def on_headers_complete(self) -> None:
        try:
            self.events.append(self._head())
        except PeerError as error:
            self._fail(error)

    def _head(self) -> RequestHead:
        parser = self._parser
        method = parser.get_method()
        if method == b"CONNECT":
            raise PeerError(405, "CONNECT is not supported by a reverse proxy")
        if not self._target.startswith(b"/"):
            raise PeerError(400, "request target must be a path (origin-form)")
        version = parser.get_http_version()
        if version not in ("1.0", "1.1"):  # HTTP/0.9 has no headers to frame or route by (HAProxy: 400)
            raise PeerError(400 if version == "0.9" else 505, f"HTTP/{version} is not supported")
        hosts = [value for name, value in self._headers if name.lower() == b"host"]
        if len(hosts) > 1 or (version == "1.1" and not hosts):
            raise PeerError(400, "a request needs exactly one Host header")
        chunked, content_length = self._framing()
        upgrade = parser.should_upgrade()
        if upgrade and (chunked or content_length):
            # llhttp ends an upgrade request at its head and hands what follows to the tunnel, so
            # the announced body would reach the backend as tunnel bytes it reads as that body.
            raise PeerError(400, "a request asking to upgrade may not carry a body")
        return RequestHead(
            method=method,
            target=self._target,
            version=version,
            headers=tuple(self._headers),
            host=hosts[0] if hosts else b"",
            keep_alive=parser.should_keep_alive(),
            upgrade=upgrade,
            chunked=chunked,
            content_length=content_length,
        )

    def feed(self, data: bytes) -> None:
        """Parse `data` into `events`; raises PeerError for anything we refuse."""
        if self.tunnel:
            self.events.append(TunnelData(data))
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.tunnel = True
            rest = data[upgrade.args[0] :]
            if rest:
                self.events.append(TunnelData(rest))
        except httptools.HttpParserError as error:
            raise self._error or PeerError(400, f"malformed request: {error}") from None


class ResponseParser(_ParserBase):
    """Parses one backend response (plus any 1xx before it) to a request with `request_method`.

    `reset` makes it parse the next response on the same connection: the C parser is kept when
    llhttp itself ended the last message (it then waits at a message boundary), and replaced
    otherwise (a HEAD response llhttp would still wait for a body of, a tunnel, an error)."""

    def __init__(self, request_method: bytes, events: deque[Event] | None = None) -> None:
        super().__init__(events)
        self._parser = httptools.HttpResponseParser(self)
        self._at_boundary = True  # llhttp is between messages: it may parse the next response
        self._start(request_method)

    def _start(self, request_method: bytes) -> None:
        self._head_only = request_method == b"HEAD"
        self._reason = b""
        self._close_delimited = False  # a final response with neither length nor chunking
        self.complete = False  # the final response has ended; nothing more is expected
        self.keep_alive = False  # the final response lets the connection be reused

    def reset(self, request_method: bytes) -> None:
        """Parse the response to the next request on this connection (into the same events)."""
        if not self._at_boundary or self.tunnel or self._error is not None:
            self._parser = httptools.HttpResponseParser(self)
            self._at_boundary = True
            self.tunnel = False
            self._error = None
        self._start(request_method)

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        if self._header_bytes > MAX_RESPONSE_HEADER_BYTES or len(self._headers) > MAX_HEADER_COUNT * 2:
            self._fail(PeerError(502, "backend response headers too large"))

    def on_message_begin(self) -> None:
        if self.complete:  # a second response in the same read: nothing asked for it
            self._fail(PeerError(502, "backend sent bytes after its response"))
        self._at_boundary = False
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        try:
            chunked, content_length = self._framing()
        except PeerError as error:
            self._fail(PeerError(502, f"backend response framing: {error.reason}"))
        has_body = not (self._head_only or 100 <= status < 200 or status in (204, 304))
        self.events.append(
            ResponseHead(
                status=status,
                reason=self._reason,
                version=self._parser.get_http_version(),
                headers=tuple(self._headers),
                keep_alive=self._parser.should_keep_alive(),
                chunked=chunked,
                content_length=content_length,
                has_body=has_body,
            )
        )
        self._reason = b""
        self._close_delimited = has_body and not chunked and content_length is None
        if status >= 200:
            self.keep_alive = self._parser.should_keep_alive() and not self._close_delimited
        if not has_body and not 100 <= status < 200:
            # llhttp would wait for a HEAD response's announced body: the message ends here.
            self.complete = True
            self.events.append(END_OF_MESSAGE)

    def on_body(self, body: bytes) -> None:
        if self.complete:  # body bytes after a HEAD response (or 204/304) that announced a length
            self._fail(PeerError(502, "backend sent a body where none is allowed"))
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._at_boundary = True
        if self.complete:
            return
        if self._parser.get_status_code() >= 200:
            self.complete = True
        self.events.append(END_OF_MESSAGE)

    def feed(self, data: bytes) -> None:
        if self.tunnel:
            self.events.append(TunnelData(data))
            return
        if self.complete:
            raise PeerError(502, "backend sent bytes after its response")
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.tunnel = True
            self.complete = True
            rest = data[upgrade.args[0] :]
            if rest:
                self.events.append(TunnelData(rest))
        except httptools.HttpParserError as error:
            raise self._error or PeerError(502, f"malformed backend response: {error}") from None

    def feed_eof(self) -> None:
        """The backend closed: that ends a read-until-close body, and is an error anywhere else."""
        if self.complete or self.tunnel:
            return
        if self._close_delimited:
            self.complete = True
            self.events.append(END_OF_MESSAGE)
            return
        raise PeerError(502, "backend closed the connection before the response was complete")


# -- serialisation for the next hop -------------------------------------------------------------

LAST_CHUNK = b"0\r\n\r\n"
# The client certificate's headers (ingress-nginx names): only the proxy may send them, from what
# the TLS handshake verified (RequestHead.vouched); a client's own copies would claim an identity.
CLIENT_CERTIFICATE_HEADERS = frozenset(
    (b"ssl-client-verify", b"ssl-client-subject-dn", b"ssl-client-issuer-dn", b"ssl-client-cert")
)
_FORWARDED_BY_US = frozenset(
    (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port", b"x-real-ip", b"expect")
) | CLIENT_CERTIFICATE_HEADERS
# Never copied from the peer's head: written from the parsed message (see the theory above), so no
# Connection token and no duplicate can change what the next hop frames or routes by.
_DERIVED_IN_REQUEST = HOP_BY_HOP | _FORWARDED_BY_US | {b"content-length", b"host"}
_DERIVED_IN_RESPONSE = HOP_BY_HOP | {b"content-length"}
REASONS = {
    301: b"Moved Permanently",
    302: b"Found",
    303: b"See Other",
    307: b"Temporary Redirect",
    308: b"Permanent Redirect",
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}


def encode_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def upstream_request_head(
    head: RequestHead,
    client_ip: bytes,
    proto: bytes,
    local_address: bytes,
    extra: bytes = b"",
    host_header: bytes = b"",
    real_ip: bytes = b"",
    forwarded_for: bytes = b"",
) -> bytes:
    """The request line and headers as sent to a backend (always HTTP/1.1).

    Headers are copied in order except the hop-by-hop ones, those the client's Connection header
    names, and those we derive: Host and the framing come from the parsed head, the forwarding
    headers from us (a client's X-Forwarded-* never pass: ingress-nginx replaces them too). `Expect` is dropped because the proxy answers 100-continue itself.
    An HTTP/1.0 request without Host gets the listener's `local_address` (`ip:port`), since
    HTTP/1.1 requires one. `extra`: header lines a route policy adds ("Name: value\r\n"...),
    written after ours and never framing (`config.route_policy` refuses CR/LF in their values and
    framing names); `host_header` replaces the Host sent (nginx `upstream-vhost`), X-Forwarded-Host
    still says what the client asked for. X-Real-IP and X-Forwarded-For are `client_ip` (the peer,
    or a PROXY header's source) unless a trusted X-Forwarded-For decided otherwise (see
    `proxy.policy.forwarded_client`): `real_ip` is then the client, `forwarded_for`, when given,
    the chain to send (compute-full-forwarded-for).
    """
    named_by_connection = connection_tokens(head.headers)
    host = head.host or local_address
    parts = [head.method, b" ", head.target, b" HTTP/1.1\r\nHost: ", host_header or host, b"\r\n"]
    upgrade = b""
    for name, value in head.headers:
        lower = name.lower()
        if lower in _DERIVED_IN_REQUEST or lower in named_by_connection:
            if lower == b"upgrade":
                upgrade = value
            continue
        parts += (name, b": ", value, b"\r\n")
    client = real_ip or client_ip
    parts += (b"X-Forwarded-For: ", forwarded_for or client, b"\r\nX-Real-IP: ", client)
    port = local_address.rpartition(b":")[2]
    parts += (b"\r\nX-Forwarded-Proto: ", proto, b"\r\nX-Forwarded-Host: ", host, b"\r\nX-Forwarded-Port: ", port)
    if head.chunked:
        parts.append(b"\r\nTransfer-Encoding: chunked")
    elif head.content_length is not None:
        parts.append(b"\r\nContent-Length: %d" % head.content_length)
    if head.upgrade and upgrade:
        parts += (b"\r\nConnection: upgrade\r\nUpgrade: ", upgrade)
    for name, value in head.vouched:
        parts += (b"\r\n", name, b": ", value)
    parts += (b"\r\n", extra, b"\r\n")
    return b"".join(parts)


def client_response_head(
    response: ResponseHead, rechunk: bool, keep_alive: bool, date: bytes, extra: bytes
) -> bytes:
    """The response head for the client: hop-by-hop dropped, our framing, Server and Date ensured.

    `rechunk`: the body goes out chunked (backend sent chunked or read-until-close); otherwise a
    parsed Content-Length is written from the parsed value (also for HEAD and 304, where it
    describes the body not sent; never for 1xx and 204, which cannot have one). `extra` is
    pre-serialised header lines ("Name: value\\r\\n"...) such as HSTS.
    """
    named_by_connection = connection_tokens(response.headers)
    parts = [b"HTTP/1.1 %d %s\r\n" % (response.status, response.reason)]
    has_server = has_date = False
    upgrade = b""
    for name, value in response.headers:
        lower = name.lower()
        if lower in _DERIVED_IN_RESPONSE or lower in named_by_connection:
            if lower == b"upgrade":
                upgrade = value
            continue
        if lower == b"server":
            has_server = True
        elif lower == b"date":
            has_date = True
        parts += (name, b": ", value, b"\r\n")
    if not has_server:
        parts.append(b"Server: ingress-proxy\r\n")
    if not has_date:
        parts += (b"Date: ", date, b"\r\n")
    if rechunk:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    elif response.content_length is not None and response.status >= 200 and response.status != 204:
        parts.append(b"Content-Length: %d\r\n" % response.content_length)
    if response.status == 101:
        parts += (b"Connection: upgrade\r\nUpgrade: ", upgrade, b"\r\n")
    elif not keep_alive:
        parts.append(b"Connection: close\r\n")
    parts += (extra, b"\r\n")
    return b"".join(parts)


def simple_body(status: int) -> bytes:
    """The plain-text body of a response the proxy makes itself."""
    return b"%d %s\n" % (status, REASONS.get(status, b"Error"))


def simple_response(
    status: int, date: bytes, close: bool, extra: bytes = b"", head_only: bool = False, body: bytes = b""
) -> bytes:
    """A short plain-text response the proxy answers by itself (errors, redirects). `head_only`:
    the answer to a HEAD request, whose Content-Length describes a body that is not sent; `body`:
    a text of its own instead of the status line's (the client certificate refusals)."""
    body = body or simple_body(status)
    return b"".join(
        (
            b"HTTP/1.1 %d %s\r\nServer: ingress-proxy\r\nDate: %s\r\n" % (status, REASONS.get(status, b"Error"), date),
            b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n" % len(body),
            b"Connection: close\r\n" if close else b"",
            extra,
            b"\r\n",
            b"" if head_only else body,
        )
    )


# The compiled twins of the two head builders (proxy/_http1_heads.pyx; proxy.compiled says when):
# the same output byte for byte, the pure functions above stay the reference and its fallback.
pure_upstream_request_head, pure_client_response_head = upstream_request_head, client_response_head
_compiled_heads = load_twin("proxy._http1_heads")
if _compiled_heads is not None:
    _compiled_heads.configure(_DERIVED_IN_REQUEST, _DERIVED_IN_RESPONSE, upstream_request_head, client_response_head)
    upstream_request_head = _compiled_heads.upstream_request_head
    client_response_head = _compiled_heads.client_response_head
