"""`--workers N`: N forked processes share the listeners the master bound before forking.

Sharing is by inheritance, not SO_REUSEPORT: the master (proxy/cli.py) binds the https/http
sockets once, exclusively, and every worker inherits the same sockets across fork, so the kernel
spreads connections over the workers' accept loops while any other process trying the address —
a second instance, a stale one — is refused at bind with a one-line error naming the address.
SO_REUSEPORT would instead let that other process join the group and take part of the traffic
unseen (issue 10 item 8). A worker that is restarted inherits the same sockets again (the master
keeps them open), so no connection is refused while it comes back. Only worker 0 runs the admin
listener and binds it itself, the same exclusive way.

The master forks before any event loop, thread or engine exists; each worker then builds its own
loop, crypto runtime (engines and engine keys are initialised after fork, as OpenSSL requires)
and route source. The master only supervises: it forwards SIGTERM/SIGINT (drain) and SIGHUP
(reload) to every worker, restarts a worker that dies unexpectedly, and exits 0 once all workers
drained. Session-ticket keys are generated once in the master and inherited, so a ticket issued
by one worker resumes in any other. Metrics use prometheus-client's multiprocess mode so the
admin listener (run by worker 0) reports all workers.

In Kubernetes mode the master also supervises one *watcher* child (`run_watcher`): the only
process that talks to the API server; it feeds every worker over proxy/generation_feed.py. A
dead watcher is restarted whatever its exit status (the workers keep serving their last
generation meanwhile); only the workers' status 1 (configuration or engine error) stops the pod.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable

from proxy.tls.libssl import TICKET_KEYS_LENGTH

LOG = logging.getLogger("ingress_proxy.workers")
RESTART_BACKOFF_SECONDS = 1.0  # a worker that keeps crashing is restarted at most once a second


WATCHER = -1  # the index the watcher child has among the workers' indexes


def run_workers(count: int, run_worker: Callable[[int, bytes], int], run_watcher: Callable[[], int] | None = None) -> int:
    """Fork `count` workers running `run_worker(index, ticket_keys)` (and one `run_watcher()`, if
    given); returns the exit status."""
    ticket_keys = os.urandom(TICKET_KEYS_LENGTH)
    children: dict[int, int] = {}  # pid → worker index, or WATCHER
    stopping = False
    last_start: dict[int, float] = {}

    def spawn(index: int) -> None:
        delay = RESTART_BACKOFF_SECONDS - (time.monotonic() - last_start.get(index, -RESTART_BACKOFF_SECONDS))
        if delay > 0:
            time.sleep(delay)
        last_start[index] = time.monotonic()
        pid = os.fork()
        if pid == 0:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(signum, signal.SIG_DFL)
            code = 1
            try:
                code = run_watcher() if run_watcher is not None and index == WATCHER else run_worker(index, ticket_keys)
            finally:
                os._exit(code)
        children[pid] = index

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum != signal.SIGHUP:
            stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    if run_watcher is not None:
        spawn(WATCHER)
    for index in range(count):
        spawn(index)
    status = 0
    while children:
        pid, wait_status = os.wait()
        if pid not in children:
            continue
        index = children.pop(pid)
        code = os.waitstatus_to_exitcode(wait_status)
        if stopping:
            status = status or (code if code > 0 else 0)
        elif index == WATCHER:
            LOG.error("the watcher (pid %d) exited with %d; restarting it, the workers keep serving", pid, code)
            spawn(index)
        elif code == 1:  # a configuration or engine error: restarting would fail the same way
            LOG.error("worker %d failed to start; stopping all workers", index)
            status = 1
            forward(signal.SIGTERM, None)
        else:
            LOG.error("worker %d (pid %d) exited with %d; restarting it", index, pid, code)
            spawn(index)
    return status
