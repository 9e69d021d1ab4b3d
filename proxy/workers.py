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

Workers take turns loading keys (`KeyLoadingLock`): every worker logs in to the same HSM token
after fork, and SoftHSM2's file store is not safe for concurrent logins from several processes —
each C_Login rewrites the token file, and a process reading it meanwhile finds no token, or a PIN
"not initialised" (4 concurrent `pkcs11-tool --login` runs: 36 of 160 failed; in turn: none). A
worker that lost that race left the key's certificate out and served the default certificate for
its hosts. Signing with keys already loaded is unaffected (150 handshakes during a loop of foreign
logins: all signed), so only the crypto part of a publish holds the lock — the runtime's start
and the key loads, and only when an engine or a provider is configured (proxy/server.py).

In Kubernetes mode the master also supervises one *watcher* child (`run_watcher`): the only
process that talks to the API server; it feeds every worker over proxy/generation_feed.py. A
dead watcher is restarted whatever its exit status (the workers keep serving their last
generation meanwhile); only the workers' status 1 (configuration or engine error) stops the pod.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import signal
import tempfile
import time
from collections.abc import Callable
from types import TracebackType

from proxy.tls.libssl import TICKET_KEYS_LENGTH

LOG = logging.getLogger("ingress_proxy.workers")
RESTART_BACKOFF_SECONDS = 1.0  # a worker that keeps crashing is restarted at most once a second


WATCHER = -1  # the index the watcher child has among the workers' indexes


class KeyLoadingLock:
    """Held by one process at a time, among those forked after it was made: an unlinked file with
    a POSIX record lock (lockf). Such locks belong to a process, so forked workers exclude each
    other although they share the descriptor, and a worker that dies lets go of it."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile()

    def __enter__(self) -> None:
        fcntl.lockf(self._file.fileno(), fcntl.LOCK_EX)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        fcntl.lockf(self._file.fileno(), fcntl.LOCK_UN)


@dataclasses.dataclass(frozen=True)
class WorkerStart:
    """What a worker inherits from the master besides the listeners."""

    index: int
    ticket_keys: bytes  # shared, so a session ticket from one worker resumes in any other
    key_loading: KeyLoadingLock  # held while a publish loads keys: workers load them in turn


def run_workers(count: int, run_worker: Callable[[WorkerStart], int], run_watcher: Callable[[], int] | None = None) -> int:
    """Fork `count` workers running `run_worker(start)` (and one `run_watcher()`, if given);
    returns the exit status."""
    ticket_keys = os.urandom(TICKET_KEYS_LENGTH)
    key_loading = KeyLoadingLock()
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
                if run_watcher is not None and index == WATCHER:
                    code = run_watcher()
                else:
                    code = run_worker(WorkerStart(index, ticket_keys, key_loading))
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
