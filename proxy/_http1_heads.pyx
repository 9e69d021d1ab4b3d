# cython: language_level=3, boundscheck=False, wraparound=False
"""Typed twins of `proxy.http1.upstream_request_head` and `client_response_head`.

Theory of operation
-------------------
The pure builders lower-case every header name into a new bytes object and look it up in two
sets; here each name is compared in place, case-folded byte by byte (ASCII only, as bytes.lower),
against the derived-name lists `proxy.http1` hands over at import (`configure`), so the rules live
in one place and cannot drift. The output is the same list of pieces joined once, byte for byte
what the pure function writes (tests/unit/test_compiled_heads.py compares both under hypothesis).

Anything unusual goes to the pure function itself, so its result (or exception) is by definition
the reference one: a name, value or argument that is not exactly `bytes`. A Connection header's
tokens are parsed as `proxy.http1.connection_tokens` does; only tokens that are not derived anyway
("close", or a custom hop-by-hop name) cost a lower-cased name per header, as in the pure builder.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE

cdef tuple _derived_request = ()
cdef tuple _derived_response = ()
cdef frozenset _derived_request_set = frozenset()
cdef frozenset _derived_response_set = frozenset()
cdef object _pure_request = None
cdef object _pure_response = None


def configure(derived_request, derived_response, pure_request, pure_response):
    """The derived-name sets and the pure functions, from proxy.http1 (called once, at its import)."""
    global _derived_request, _derived_response, _derived_request_set, _derived_response_set
    global _pure_request, _pure_response
    _derived_request, _derived_response = tuple(sorted(derived_request)), tuple(sorted(derived_response))
    _derived_request_set, _derived_response_set = frozenset(derived_request), frozenset(derived_response)
    _pure_request, _pure_response = pure_request, pure_response


cdef inline bint _same_folded(bytes name, const char *lower, Py_ssize_t length):
    """name.lower() == lower, without building name.lower()."""
    if PyBytes_GET_SIZE(name) != length:
        return False
    cdef const unsigned char *raw = <const unsigned char *>PyBytes_AS_STRING(name)
    cdef Py_ssize_t i
    cdef unsigned char c
    for i in range(length):
        c = raw[i]
        if 65 <= c <= 90:
            c += 32
        if c != <unsigned char>lower[i]:
            return False
    return True


cdef inline bint _in_folded(bytes name, tuple names):
    cdef bytes candidate
    for candidate in names:
        if _same_folded(name, PyBytes_AS_STRING(candidate), PyBytes_GET_SIZE(candidate)):
            return True
    return False


cdef enum Shape:
    UNUSUAL = 0  # not a tuple of (bytes, bytes) pairs: the pure builder decides
    PLAIN = 1
    HAS_CONNECTION = 2


cdef inline Shape _shape(headers):
    if type(headers) is not tuple:
        return UNUSUAL
    cdef Shape shape = PLAIN
    cdef object pair
    for pair in <tuple>headers:
        if type(pair) is not tuple or len(<tuple>pair) != 2:
            return UNUSUAL
        if type((<tuple>pair)[0]) is not bytes or type((<tuple>pair)[1]) is not bytes:
            return UNUSUAL
        if _same_folded((<tuple>pair)[0], b"connection", 10):
            shape = HAS_CONNECTION
    return shape


cdef set _named_by_connection(headers, Shape shape, frozenset derived):
    """The Connection tokens that are not derived anyway (often none), parsed as connection_tokens."""
    if shape != HAS_CONNECTION:
        return None
    cdef set tokens = set()
    cdef bytes name, value
    for name, value in <tuple>headers:
        if _same_folded(name, b"connection", 10):
            for token in value.split(b","):
                tokens.add(token.strip().lower())
    tokens.difference_update(derived)
    return tokens if tokens else None


def upstream_request_head(head, client_ip, proto, local_address, extra=b"", host_header=b"", real_ip=b"", forwarded_for=b""):
    headers, vouched = head.headers, head.vouched
    method, target, parsed_host = head.method, head.target, head.host
    cdef Shape shape = _shape(headers)
    if not (
        shape != UNUSUAL
        and _shape(vouched) != UNUSUAL
        and type(method) is bytes and type(target) is bytes and type(parsed_host) is bytes
        and type(client_ip) is bytes and type(proto) is bytes and type(local_address) is bytes
        and type(extra) is bytes and type(host_header) is bytes and type(real_ip) is bytes
        and type(forwarded_for) is bytes
    ):
        return _pure_request(head, client_ip, proto, local_address, extra, host_header, real_ip, forwarded_for)
    cdef set named = _named_by_connection(headers, shape, _derived_request_set)
    cdef bytes host = parsed_host or local_address
    cdef list parts = [method, b" ", target, b" HTTP/1.1\r\nHost: ", host_header or host, b"\r\n"]
    cdef bytes upgrade = b""
    cdef bytes name, value
    for name, value in <tuple>headers:
        if _in_folded(name, _derived_request):
            if _same_folded(name, b"upgrade", 7):
                upgrade = value
            continue
        if named is not None and name.lower() in named:
            continue
        parts.append(name)
        parts.append(b": ")
        parts.append(value)
        parts.append(b"\r\n")
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
    for name, value in <tuple>vouched:
        parts += (b"\r\n", name, b": ", value)
    parts += (b"\r\n", extra, b"\r\n")
    return b"".join(parts)


def client_response_head(response, rechunk, keep_alive, date, extra):
    headers = response.headers
    cdef Shape shape = _shape(headers)
    if not (shape != UNUSUAL and type(date) is bytes and type(extra) is bytes):
        return _pure_response(response, rechunk, keep_alive, date, extra)
    cdef set named = _named_by_connection(headers, shape, _derived_response_set)
    status = response.status
    cdef list parts = [b"HTTP/1.1 %d %s\r\n" % (status, response.reason)]
    cdef bint has_server = False
    cdef bint has_date = False
    cdef bytes upgrade = b""
    cdef bytes name, value
    for name, value in <tuple>headers:
        if _in_folded(name, _derived_response):
            if _same_folded(name, b"upgrade", 7):
                upgrade = value
            continue
        if named is not None and name.lower() in named:
            continue
        if _same_folded(name, b"server", 6):
            has_server = True
        elif _same_folded(name, b"date", 4):
            has_date = True
        parts.append(name)
        parts.append(b": ")
        parts.append(value)
        parts.append(b"\r\n")
    if not has_server:
        parts.append(b"Server: ingress-proxy\r\n")
    if not has_date:
        parts += (b"Date: ", date, b"\r\n")
    content_length = response.content_length
    if rechunk:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    elif content_length is not None and status >= 200 and status != 204:
        parts.append(b"Content-Length: %d\r\n" % content_length)
    if status == 101:
        parts += (b"Connection: upgrade\r\nUpgrade: ", upgrade, b"\r\n")
    elif not keep_alive:
        parts.append(b"Connection: close\r\n")
    parts += (extra, b"\r\n")
    return b"".join(parts)
