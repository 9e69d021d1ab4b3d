"""The PROXY protocol header reader (proxy.proxy_protocol), in memory: tables for both versions,
then properties over random splits, truncations, garbage and the v1/v2 encodings of one address.

The encoders here are written from the specification (haproxy proxy-protocol.txt), separately
from the reader, so that a reader bug cannot hide behind a matching encoder bug."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.proxy_protocol import V1_MAX_LENGTH, V2_MAX_PAYLOAD, V2_SIGNATURE, ProxyHeader, ProxyHeaderError, ProxyHeaderReader

CLIENT_HELLO = b"\x16\x03\x01\x00\xc8\x01\x00\x00\xc4\x03\x03" + bytes(range(32))  # what follows on a TLS listener


def v1(source: str, destination: str | None = None, ports: tuple[int, int] = (51234, 443)) -> bytes:
    version = ipaddress.ip_address(source).version
    family = "TCP4" if version == 4 else "TCP6"
    return f"PROXY {family} {source} {destination or _our_address(version)} {ports[0]} {ports[1]}\r\n".encode()


def _our_address(version: int) -> str:
    return "10.0.0.1" if version == 4 else "2001:db8::1"


def v2(source: str | None, destination: str | None = None, tlvs: bytes = b"", command: int = 0x21, family: int | None = None) -> bytes:
    """A v2 header; `source` None: no addresses (AF_UNSPEC)."""
    if source is None:
        block, family_byte = b"", 0x00
    else:
        src = ipaddress.ip_address(source)
        dst = ipaddress.ip_address(destination or _our_address(src.version))
        block = src.packed + dst.packed + struct.pack("!HH", 51234, 443)
        family_byte = 0x11 if src.version == 4 else 0x21
    if family is not None:
        family_byte = family
    payload = block + tlvs
    return V2_SIGNATURE + bytes((command, family_byte)) + struct.pack("!H", len(payload)) + payload


def tlv(kind: int, value: bytes) -> bytes:
    return bytes((kind,)) + struct.pack("!H", len(value)) + value


def read(data: bytes) -> tuple[ProxyHeader, bytes] | None:
    return ProxyHeaderReader().feed(data)


@pytest.mark.parametrize(("header", "source"), [
    (v1("192.0.2.7"), b"192.0.2.7"),
    (v1("2001:DB8:0:0::7", "2001:db8::1"), b"2001:db8::7"),  # one spelling per address
    (b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n", b"0.0.0.0"),
    (b"PROXY UNKNOWN\r\n", None),  # the balancer does not know: the TCP peer stays the client
    (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", None),  # anything after UNKNOWN is ignored
    (b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 16) + b"\r\n", None),  # 107 bytes: the longest allowed
    (b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
     b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),  # the longest v1 header: 104 bytes
    (v2("192.0.2.7"), b"192.0.2.7"),
    (v2("2001:db8::7", "2001:db8::1"), b"2001:db8::7"),
    (v2("192.0.2.7", tlvs=tlv(0x01, b"h2") + tlv(0x05, b"vpce-0123") + tlv(0x20, b"\x01" + bytes(8))), b"192.0.2.7"),
    (v2("192.0.2.7", tlvs=tlv(0xEE, b"")), b"192.0.2.7"),  # an empty TLV
    (v2("192.0.2.7", command=0x20), None),  # LOCAL (a health check from the balancer): the TCP peer
    (v2(None, command=0x20), None),
    (v2(None), None),  # PROXY over AF_UNSPEC: the TCP peer
    (v2("192.0.2.7", tlvs=bytes((0x04,)) + struct.pack("!H", V2_MAX_PAYLOAD - 15) + bytes(V2_MAX_PAYLOAD - 15)),
     b"192.0.2.7"),  # the largest accepted header
])  # fmt: skip
def test_valid_headers(header: bytes, source: bytes | None) -> None:
    found = read(header + CLIENT_HELLO)
    assert found is not None
    parsed, rest = found
    assert parsed.source == source and parsed.version == (1 if header.startswith(b"PROXY") else 2)
    assert rest == CLIENT_HELLO


@pytest.mark.parametrize(("data", "reason"), [
    (CLIENT_HELLO, "no PROXY protocol header"),  # a bare TLS client on a PROXY listener
    (b"GET / HTTP/1.1\r\n", "no PROXY protocol header"),
    (b"PROXYTCP4", "no PROXY protocol header"),
    (b"proxy TCP4 1.2.3.4 1.2.3.4 1 2\r\n", "no PROXY protocol header"),
    (b"PROXY TCP4 192.0.2.7 10.0.0.1 51234 443\n", "bare CR or LF"),
    (b"PROXY TCP4 192.0.2.7\r10.0.0.1", "bare CR or LF"),
    (b"PROXY TCP4 192.0.2.7 10.0.0.1 51234\r\n", "is not 'PROXY TCP4|TCP6"),
    (b"PROXY TCP4 192.0.2.7  10.0.0.1 51234 443\r\n", "is not 'PROXY TCP4|TCP6"),  # two spaces
    (b"PROXY TCP5 192.0.2.7 10.0.0.1 51234 443\r\n", "is not 'PROXY TCP4|TCP6"),
    (b"PROXY TCP4 2001:db8::7 10.0.0.1 51234 443\r\n", "bad address"),  # not the family named
    (b"PROXY TCP6 192.0.2.7 2001:db8::1 51234 443\r\n", "bad address"),
    (b"PROXY TCP4 192.0.2.007 10.0.0.1 51234 443\r\n", "bad address"),
    (b"PROXY TCP6 fe80::1%eth0 fe80::2 51234 443\r\n", "bad address"),
    (b"PROXY TCP4 192.0.2.7 10.0.0.1 65536 443\r\n", "bad port"),
    (b"PROXY TCP4 192.0.2.7 10.0.0.1 -1 443\r\n", "bad port"),
    (b"PROXY TCP4 192.0.2.7 10.0.0.1 +1 443\r\n", "bad port"),
    (b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 15) + b"\r\n", "longer than 107"),  # 108 bytes
    (b"PROXY TCP4 " + b"1" * 200, "longer than 107"),
    (V2_SIGNATURE[:11] + b"X", "no PROXY protocol header"),
    (V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12), "version 1"),
    (V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12), "version 3"),
    (V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12), "unknown command 2"),
    (v2("192.0.2.7", family=0x12), "UDP over IPv4"),
    (v2("2001:db8::7", family=0x22), "UDP over IPv6"),
    (V2_SIGNATURE + b"\x21\x31\x00\xd8" + bytes(216), "AF_UNIX stream"),
    (v2("192.0.2.7", family=0x10), "unknown address family/transport 0x10"),
    (v2("192.0.2.7", family=0x41), "unknown address family/transport 0x41"),
    (V2_SIGNATURE + b"\x21\x11\x00\x08" + bytes(8), "too short for its 12-byte addresses"),
    (V2_SIGNATURE + b"\x21\x21\x00\x0c" + bytes(12), "too short for its 36-byte addresses"),
    (V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", V2_MAX_PAYLOAD + 1), "at most 4096 accepted"),
    (V2_SIGNATURE + b"\x21\x11\xff\xff", "at most 4096 accepted"),  # refused before 64 KiB are buffered
    (v2("192.0.2.7", tlvs=b"\x01\x00"), "ends inside a TLV"),
    (v2("192.0.2.7", tlvs=b"\x01\x00\x05abc"), "TLV longer than the header"),
    (v2("192.0.2.7", tlvs=tlv(0x01, b"h2") + b"\x02"), "ends inside a TLV"),
])  # fmt: skip
def test_refused_headers(data: bytes, reason: str) -> None:
    with pytest.raises(ProxyHeaderError, match=reason.replace("|", r"\|").replace("+", r"\+")):
        read(data)


@pytest.mark.parametrize("prefix", [b"", b"P", b"PROXY TCP4 192.0.2.7 10.0.0.1 51234 44", b"PROXY UNKNOWN\r", V2_SIGNATURE[:5],
                                    V2_SIGNATURE + b"\x21\x11\x00", v2("192.0.2.7")[:-1]])  # fmt: skip
def test_incomplete_headers_wait_for_more(prefix: bytes) -> None:
    assert read(prefix) is None


@pytest.mark.parametrize("prefix", [b"P", b"PROXY TCP4 192.0.2.7 10.0.0.1 51234 44", b"PROXY UNKNOWN\r", V2_SIGNATURE[:5],
                                    V2_SIGNATURE + b"\x21\x11\x00", v2("192.0.2.7")[:-1]])  # fmt: skip
def test_input_ending_inside_a_header_refuses_it(prefix: bytes) -> None:
    """FIN after part of a header: no more can come, so it is refused now (the shell counts it)."""
    reader = ProxyHeaderReader()
    assert reader.feed(prefix) is None
    with pytest.raises(ProxyHeaderError, match=f"ended after {len(prefix)} bytes, inside the PROXY header"):
        reader.input_ended()


@pytest.mark.parametrize("pieces", [(), (b"",)])
def test_input_ending_before_any_byte_is_no_refusal(pieces: tuple[bytes, ...]) -> None:
    """Connect, then close, having sent nothing: a TCP health check, closed but not refused."""
    reader = ProxyHeaderReader()
    for piece in pieces:
        assert reader.feed(piece) is None
    assert reader.input_ended() is None


def test_a_bare_tls_client_is_refused_on_its_first_byte() -> None:
    """No waiting for 107 bytes: 0x16 (a TLS record) can begin neither signature."""
    with pytest.raises(ProxyHeaderError):
        read(CLIENT_HELLO[:1])


addresses = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
)
encoders = st.sampled_from([v1, v2])


@settings(max_examples=300, deadline=None)
@given(addresses, encoders, st.binary(max_size=64), st.data())
def test_any_split_gives_the_same_header_and_rest(address: str, encode, after: bytes, data) -> None:  # type: ignore[no-untyped-def]
    """Fed in pieces cut anywhere, the reader answers None until the last header byte, then the
    same header and exactly the bytes after it, whatever they are."""
    wire = encode(address) + after
    header_length = len(wire) - len(after)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    reader = ProxyHeaderReader()
    result = None
    position = 0
    for cut in [*cuts, len(wire)]:
        piece, position = wire[position:cut], max(position, cut)
        if not piece and result is None and position < header_length:
            continue
        result = reader.feed(piece)
        if position < header_length:
            assert result is None
        else:
            break
    assert result is not None
    parsed, rest = result
    assert parsed.source == str(ipaddress.ip_address(address)).encode()
    assert rest == wire[header_length:position]


@settings(max_examples=300, deadline=None)
@given(addresses)
def test_v1_and_v2_encodings_of_one_address_agree(address: str) -> None:
    first, second = read(v1(address)), read(v2(address))
    assert first is not None and second is not None
    assert first[0].source == second[0].source == str(ipaddress.ip_address(address)).encode()


@settings(max_examples=300, deadline=None)
@given(addresses, encoders, st.data())
def test_truncated_headers_never_parse(address: str, encode, data) -> None:  # type: ignore[no-untyped-def]
    wire = encode(address)
    cut = data.draw(st.integers(0, len(wire) - 1))
    assert read(wire[:cut]) is None


@settings(max_examples=300, deadline=None)
@given(addresses, encoders, st.data())
def test_any_truncation_then_input_ended_is_refused(address: str, encode, data) -> None:  # type: ignore[no-untyped-def]
    """Every cut of a valid header, fed in two pieces split anywhere, then FIN: refused, never waited for."""
    wire = encode(address)
    cut = data.draw(st.integers(1, len(wire) - 1))
    split = data.draw(st.integers(0, cut))
    reader = ProxyHeaderReader()
    assert reader.feed(wire[:split]) is None and reader.feed(wire[split:cut]) is None
    with pytest.raises(ProxyHeaderError, match="inside the PROXY header"):
        reader.input_ended()


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_is_refused_or_waited_for_never_misread(garbage: bytes) -> None:
    """Random bytes are refused, or (a prefix of a signature) waited for, or — only if they are a
    real header — parsed into a source that is an IP address and a rest that is their tail."""
    try:
        result = read(garbage)
    except ProxyHeaderError:
        return
    if result is None:
        assert len(garbage) < V1_MAX_LENGTH or garbage.startswith(V2_SIGNATURE)
        return
    parsed, rest = result
    assert garbage.endswith(rest)
    assert parsed.source is None or ipaddress.ip_address(parsed.source.decode())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=6), st.sampled_from(["192.0.2.7", "2001:db8::7"]))
def test_v2_tlvs_of_any_shape_are_skipped(tlvs: list[tuple[int, bytes]], address: str) -> None:
    header = v2(address, tlvs=b"".join(tlv(kind, value) for kind, value in tlvs))
    result = read(header + CLIENT_HELLO)
    assert result is not None and result[0].source == address.encode() and result[1] == CLIENT_HELLO
