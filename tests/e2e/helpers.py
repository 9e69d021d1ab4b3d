"""Raw loopback clients for end-to-end tests: exact bytes on the wire, real TLS (stdlib ssl)."""

from __future__ import annotations

import asyncio
import ssl

import trustme


def tls_client_context(ca: trustme.CA | None = None, **options: object) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if ca is not None:
        ca.configure_trust(context)
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    for name, value in options.items():
        setattr(context, name, value)
    return context


async def open_raw(
    port: int, tls: ssl.SSLContext | None = None, server_name: str | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if tls is None:
        return await asyncio.open_connection("127.0.0.1", port)
    return await asyncio.open_connection("127.0.0.1", port, ssl=tls, server_hostname=server_name or "", ssl_handshake_timeout=5)


async def read_response(reader: asyncio.StreamReader, timeout: float = 5) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 response with a Content-Length or chunked body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = b""
    if "content-length" in headers:
        body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), timeout)
    elif headers.get("transfer-encoding") == "chunked":
        while True:
            size = int((await asyncio.wait_for(reader.readline(), timeout)).split(b";")[0], 16)
            chunk = await asyncio.wait_for(reader.readexactly(size + 2), timeout)
            if size == 0:
                break
            body += chunk[:-2]
    return status, headers, body


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float = 5) -> bool:
    """True when the peer closes within `timeout` (whatever it sends first, e.g. a TLS alert)."""
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        while await asyncio.wait_for(reader.read(65536), max(0.01, deadline - asyncio.get_running_loop().time())):
            pass
    except (ConnectionError, ssl.SSLError):
        return True
    except TimeoutError:
        return False
    return True


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096
