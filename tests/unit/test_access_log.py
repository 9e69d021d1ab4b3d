"""The batched access log (proxy/access_log.py): line formats, and batches written in one write."""

from __future__ import annotations

import asyncio
import io
import json

from proxy.access_log import FLUSH_AT, FLUSH_SECONDS, AccessLog, format_entry

ENTRY = (b"10.0.0.7", "https", "h2", b"shop.test", b"GET", b"/cart?x=1", 200, "shop", 0.0123456, False)


def test_text_and_json_lines_carry_the_same_fields() -> None:
    assert format_entry(ENTRY) == '10.0.0.7 https h2 "GET shop.test/cart?x=1" 200 shop 12.346ms'
    assert json.loads(format_entry((*ENTRY[:-1], True))) == {
        "client": "10.0.0.7", "listener": "https", "protocol": "h2", "host": "shop.test", "method": "GET",
        "target": "/cart?x=1", "status": 200, "backend": "shop", "duration_ms": 12.346,
    }  # fmt: skip


class CountingStream(io.StringIO):
    writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


async def test_lines_wait_for_the_batch_then_go_out_in_one_write() -> None:
    stream = CountingStream()
    log = AccessLog()
    log.enable(stream)
    for _ in range(3):
        log.record(ENTRY)
    assert stream.getvalue() == ""  # nothing written per request
    await asyncio.sleep(FLUSH_SECONDS * 2)
    assert stream.writes == 1 and stream.getvalue().count("\n") == 3


async def test_a_full_batch_is_written_at_once_and_flush_empties_the_rest() -> None:
    stream = CountingStream()
    log = AccessLog()
    log.enable(stream)
    for _ in range(FLUSH_AT + 2):
        log.record(ENTRY)
    assert stream.writes == 1 and stream.getvalue().count("\n") == FLUSH_AT
    log.flush()
    assert stream.writes == 2 and stream.getvalue().count("\n") == FLUSH_AT + 2
