"""The PROXY protocol header (HAProxy's, v1 text and v2 binary) read before TLS, sans-IO.

Theory of operation
-------------------
An L4 load balancer (HAProxy `send-proxy[-v2]`, AWS NLB, a cloud's TCP proxy) that forwards a
client's TCP stream to us can prepend one header saying who the client was. On a listener that
requires it, the connection must start with that header; whatever follows it is the client's own
stream (the TLS ClientHello, or HTTP/1.1 on the plain listener). `ProxyHeaderReader` is fed the
connection's first reads as they come (a header may arrive split at any byte) and answers: not
yet (None), or the parsed `ProxyHeader` plus the bytes after it, or a `ProxyHeaderError`. When the
peer's input ends (FIN) before that answer, the shell says so (`input_ended`): a header cut short
is refused at once, not left to the handshake timeout; a connection that sent nothing at all is
only closed (see `input_ended` for why it is not a refusal).

Required-or-refused, never guessed: a connection whose first bytes cannot begin either signature
is refused at once (it does not wait for 107 bytes of a TLS ClientHello), a header that breaks
any rule of the specification is refused, and nothing is ever taken from a connection's own bytes
on a listener that does not require the header (there a PROXY header is just a bad ClientHello).
A refusal closes the connection; the shell counts it (`metrics.PROXY_HEADER_REFUSALS`) and logs it.

The two encodings (haproxy.org/download/2.9/doc/proxy-protocol.txt):
- v1: `PROXY TCP4|TCP6 <src> <dst> <src port> <dst port>\\r\\n`, or `PROXY UNKNOWN<anything>\\r\\n`,
  at most 107 bytes with the CRLF. Fields are separated by exactly one space; addresses must be of
  the family named; ports are decimal 0..65535.
- v2: a 12-byte signature, a version/command byte (0x20 LOCAL, 0x21 PROXY), an address family and
  transport byte, a big-endian length, then that many bytes: the addresses (12 bytes for TCP over
  IPv4, 36 for IPv6) followed by TLVs, which we check for framing and skip (we use none of them).

What the client address is: the header's source address for TCP4/TCP6 and for a v2 PROXY command
over AF_INET/AF_INET6 STREAM. For v1 UNKNOWN, a v2 LOCAL command (the balancer's own health
check) and a v2 PROXY command with AF_UNSPEC, the specification says to use the connection's real
endpoints: `ProxyHeader.source` is None and the TCP peer stays the client. v2 over UDP or AF_UNIX
is refused: we serve TCP clients, and a socket path is not an address a policy can judge.
"""

from __future__ import annotations

import ipaddress
import logging
import struct
from dataclasses import dataclass

from proxy import metrics

LOG = logging.getLogger("ingress_proxy")

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX_LENGTH = 107  # the specification's bound, CRLF included: a v1 header never needs more
V2_FIXED_LENGTH = 16  # signature, version/command, family/transport, length
# The variable part of a v2 header we accept: addresses (36 bytes for IPv6) plus TLVs. Balancers
# send a few small TLVs (AWS NLB: a VPC endpoint id; GCP: a PSC connection id; TLS details from
# HAProxy's send-proxy-v2-ssl are well under 1 KiB); 4 KiB bounds what one unauthenticated
# connection makes us buffer before it has said anything useful, without refusing those.
V2_MAX_PAYLOAD = 4096

_V2_LOCAL = 0x20
_V2_PROXY = 0x21
_V2_UNSPEC = 0x00
_V2_TCP4 = 0x11
_V2_TCP6 = 0x21
_V2_ADDRESS_LENGTH = {_V2_TCP4: 12, _V2_TCP6: 36}
_V2_NAMED_FAMILIES = {0x12: "UDP over IPv4", 0x22: "UDP over IPv6", 0x31: "AF_UNIX stream", 0x32: "AF_UNIX datagram"}
_TLV_HEAD = 3  # type (1 byte) + length (2 bytes)


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    version: int  # 1 or 2
    source: bytes | None  # the client's address as text (b"192.0.2.7", b"2001:db8::7"); None: the TCP peer


class ProxyHeaderError(Exception):
    """The connection does not start with a valid PROXY header; `reason` says which rule broke."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ProxyHeaderReader:
    """Bytes in until one header is complete; then (the header, the bytes after it) once."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> tuple[ProxyHeader, bytes] | None:
        """None: the header is not complete yet. Raises ProxyHeaderError on a bad or missing header."""
        buffer = self._buffer + data
        self._buffer = buffer
        if buffer[:1] == b"P":
            return _v1(buffer)
        return _v2(buffer)

    def input_ended(self) -> None:
        """The peer closed its side before `feed` answered. Raises ProxyHeaderError when part of
        a header came: a header cut short is refused like a bad one, at once (no more can come).
        Returns when nothing came at all: connect-then-close is what TCP health checks do (a
        balancer's, a kubelet tcpSocket probe), so the shell closes it without counting a refusal."""
        if self._buffer:
            raise ProxyHeaderError(
                f"the connection ended after {len(self._buffer)} bytes, inside the PROXY header"
            )


def _v1(buffer: bytes) -> tuple[ProxyHeader, bytes] | None:
    if not V1_PREFIX.startswith(buffer[: len(V1_PREFIX)]):
        raise ProxyHeaderError("no PROXY protocol header (the connection must start with one on this listener)")
    end = buffer.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        if len(buffer) >= V1_MAX_LENGTH:
            raise ProxyHeaderError(f"PROXY v1 header longer than {V1_MAX_LENGTH} bytes or without CRLF")
        if b"\n" in buffer or b"\r" in buffer[:-1]:
            raise ProxyHeaderError("PROXY v1 header with a bare CR or LF (it must end with CRLF)")
        return None
    line = buffer[len(V1_PREFIX) : end]
    rest = buffer[end + 2 :]
    if line.startswith(b"UNKNOWN"):
        return ProxyHeader(1, None), rest  # the specification: ignore the rest of the line
    fields = line.split(b" ")
    if len(fields) != 5 or fields[0] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError("PROXY v1 header is not 'PROXY TCP4|TCP6 <src> <dst> <sport> <dport>' or 'PROXY UNKNOWN'")
    family, source, destination, source_port, destination_port = fields
    version = 4 if family == b"TCP4" else 6
    client = _ip_address(source, version, family)
    _ip_address(destination, version, family)
    for port in (source_port, destination_port):
        if not (port.isdigit() and len(port) <= 5 and int(port) <= 65535):
            raise ProxyHeaderError(f"PROXY v1 header with a bad port {port[:8]!r}")
    return ProxyHeader(1, client), rest


def _v2(buffer: bytes) -> tuple[ProxyHeader, bytes] | None:
    if not V2_SIGNATURE.startswith(buffer[: len(V2_SIGNATURE)]):
        raise ProxyHeaderError("no PROXY protocol header (the connection must start with one on this listener)")
    if len(buffer) < V2_FIXED_LENGTH:
        return None
    command, family = buffer[12], buffer[13]
    (length,) = struct.unpack_from("!H", buffer, 14)
    if command >> 4 != 2:
        raise ProxyHeaderError(f"PROXY v2 signature with version {command >> 4} (only 2 exists)")
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise ProxyHeaderError(f"PROXY v2 header with an unknown command {command & 0x0F}")
    if length > V2_MAX_PAYLOAD:
        raise ProxyHeaderError(f"PROXY v2 header of {length} bytes after the fixed part (at most {V2_MAX_PAYLOAD} accepted)")
    if command == _V2_PROXY and family not in (_V2_UNSPEC, _V2_TCP4, _V2_TCP6):
        named = _V2_NAMED_FAMILIES.get(family)
        raise ProxyHeaderError(
            f"PROXY v2 header for {named} (only TCP clients are served)" if named
            else f"PROXY v2 header with an unknown address family/transport 0x{family:02x}"
        )  # fmt: skip
    end = V2_FIXED_LENGTH + length
    if len(buffer) < end:
        return None
    payload, rest = buffer[V2_FIXED_LENGTH:end], buffer[end:]
    if command == _V2_LOCAL or family == _V2_UNSPEC:
        return ProxyHeader(2, None), rest  # the specification: use the connection's real endpoints
    address_length = _V2_ADDRESS_LENGTH[family]
    if length < address_length:
        raise ProxyHeaderError(f"PROXY v2 header of {length} bytes, too short for its {address_length}-byte addresses")
    _check_tlvs(payload, address_length)
    half = (address_length - 4) // 2
    source = ipaddress.ip_address(payload[:half])
    return ProxyHeader(2, str(source).encode()), rest


def _check_tlvs(payload: bytes, offset: int) -> None:
    """The TLVs after the addresses must tile the rest of the header exactly (we skip their values)."""
    while offset < len(payload):
        if len(payload) - offset < _TLV_HEAD:
            raise ProxyHeaderError("PROXY v2 header ends inside a TLV's type and length")
        (value_length,) = struct.unpack_from("!H", payload, offset + 1)
        offset += _TLV_HEAD + value_length
        if offset > len(payload):
            raise ProxyHeaderError("PROXY v2 header with a TLV longer than the header")


def _ip_address(text: bytes, version: int, family: bytes) -> bytes:
    """`text` as one spelling of an address of `version` (`2001:DB8::0:7` → `2001:db8::7`, as a
    socket peer is reported), or ProxyHeaderError."""
    try:
        if b"%" in text:
            raise ValueError  # an IPv6 zone ("fe80::1%eth0") names an interface of the sender, not a client
        address = ipaddress.IPv4Address(text.decode("ascii")) if version == 4 else ipaddress.IPv6Address(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ProxyHeaderError(f"PROXY v1 {family.decode()} header with a bad address {text[:40]!r}") from None
    return str(address).encode()


# -- the shell's bookkeeping (proxy.downstream calls this when it closes a refused connection) --

_LISTENERS_WARNED: set[str] = set()


def count_refusal(listener: str, peer: bytes, reason: str) -> None:
    """Count a refused connection; log the first one per listener at info (it usually means the
    balancer in front does not send the header: a configuration mistake), the rest at debug."""
    metrics.PROXY_HEADER_REFUSALS.labels(listener).inc()
    level = logging.DEBUG if listener in _LISTENERS_WARNED else logging.INFO
    _LISTENERS_WARNED.add(listener)
    LOG.log(level, "listener %s requires a PROXY protocol header: closed the connection from %s: %s "
            "(make the load balancer send PROXY v1 or v2, or turn proxy_protocol off)", listener, peer.decode(), reason)
