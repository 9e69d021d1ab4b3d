"""A wire-faithful fake kube-apiserver for tests, speaking the JSON protocol kubernetes-asyncio uses.

Theory of operation
-------------------
`FakeApiServer` is an aiohttp application on 127.0.0.1 over a `Store` (store.py). Paths are the
real ones: `/api/v1/...` for the core group, `/apis/<group>/<version>/...` for the others, with
`namespaces/<ns>/` for namespaced resources and the same path without it for all-namespaces LIST
and WATCH. Served resources: networking.k8s.io/v1 ingresses (+status) and ingressclasses; v1
services (+status), secrets, configmaps, events, namespaces; discovery.k8s.io/v1 endpointslices;
coordination.k8s.io/v1 leases.

* LIST answers `<Kind>List` with `metadata.resourceVersion` = the global counter; items carry no
  kind/apiVersion (as the real server encodes typed lists). `resourceVersion` unset, "0" or a
  version with `resourceVersionMatch=NotOlderThan` (the default) return the current state, as the
  watch cache does; `resourceVersionMatch=Exact` — and, as on the real server, a version with
  `limit` and no match given — returns the state at that version, or 410 Expired when it left the
  compaction window.
* WATCH (`watch=1|true`) answers 200 with one JSON event per line. Without resourceVersion (or
  "0") it first sends ADDED for every current object; with one it replays history after it, or
  sends one ERROR event carrying a 410 Expired Status and ends the stream when the version is
  older than the window (the last `history_limit` writes). Objects that start or stop matching a
  selector on update arrive as ADDED/DELETED. `allowWatchBookmarks` adds a BOOKMARK (only kind,
  apiVersion, metadata.resourceVersion) every `bookmark_interval` seconds; `timeoutSeconds` ends
  the stream cleanly.
* Writes: POST 201 / PUT / PATCH 200 / DELETE 200 (Status Success) or 202 (object kept by
  finalizers, deletionTimestamp set; it goes when an update empties `finalizers`). uid,
  creationTimestamp, generation (bumped on changes outside metadata/status) and resourceVersion
  are the server's. PUT or PATCH carrying a stale metadata.resourceVersion → 409 Conflict; create of
  an existing name → 409 AlreadyExists; missing → 404 NotFound; every error is a `kind: Status`
  body. On kinds with a status subresource, create clears status, the main resource ignores
  status changes, and `/status` ignores everything but status.
* Validation that matters to an Ingress controller: object names (RFC 1123 subdomain), Ingress
  pathType/path/backend shape, TLS Secrets need tls.crt and tls.key, immutable Secret type and
  Service clusterIP, EndpointSlice address types — and loopback EndpointSlice addresses are
  rejected like on a real server ("may not be in the loopback range") unless the server was made
  with `allow_loopback=True`.
* Defaults: Service type ClusterIP, a clusterIP from 10.96.0.0/16, port protocol TCP and
  targetPort = port; Secret type Opaque; EndpointSlice port protocol TCP.

Deviations from a real kube-apiserver (deliberate; tests must not rely on them):
* `allow_loopback=True` accepts 127.0.0.0/8 and ::1 in EndpointSlices (test-only, so backends can
  be real loopback servers).
* No authentication, authorization or admission plugins; no namespace lifecycle (objects may be
  created in namespaces that do not exist, deleting a Namespace deletes nothing); no garbage
  collection (ownerReferences are stored, never acted on); no controllers (nothing creates
  EndpointSlices for Services or assigns load-balancer status).
* Strategic merge patch is applied as JSON merge patch (lists replaced, no `$patch` directives);
  server-side apply (`application/apply-patch+yaml`) answers 415; dryRun, fieldManager,
  managedFields, `limit`/`continue` pagination and DeleteOptions preconditions are ignored (a LIST
  always returns everything, which clients must accept anyway).
* metadata.generation is kept for every kind (the real server only for some, e.g. not ConfigMaps).
* The compaction window counts writes (`history_limit`), not minutes; resourceVersions are small
  integers; only the validation listed above is performed; watches have no server-side default
  timeout unless `default_watch_timeout` is given (the real server picks 30–60 min).
* Only JSON; no protobuf, no discovery documents beyond `/version`.

Fault hooks for tests (`drop_watches`, `stall_watches`, `fail_next`/`clear_faults`, `compact`, `stop`,
`restart`)
simulate what a real control plane does under upgrade, overload or etcd compaction.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.fake_apiserver.patches import PatchError, json_patch, merge_patch
from tests.fake_apiserver.store import (
    RESOURCES,
    ApiError,
    JsonObject,
    ResourceType,
    Selection,
    Store,
    WatchEvent,
)

_RESOURCES_BY_PATH = {(r.group, r.version, r.plural): r for r in RESOURCES}
_TRUE = ("1", "true", "True")


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _json_response(obj: JsonObject, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=_dumps(obj), status=status, content_type="application/json", headers=headers)


def _error_response(error: ApiError) -> web.Response:
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else None
    return _json_response(error.status(), error.code, headers)


@dataclass
class _Fault:
    status: int
    remaining: int
    path_contains: str
    method: str | None
    retry_after: int

    def matches(self, request: web.Request) -> bool:
        return self.path_contains in request.path_qs and (self.method is None or self.method == request.method)

    def error(self) -> ApiError:
        if self.status == 429:
            return ApiError(
                429,
                "TooManyRequests",
                "Too many requests, please try again later.",
                {"retryAfterSeconds": self.retry_after},
                retry_after=self.retry_after,
            )
        if self.status == 410:
            return ApiError(410, "Expired", "The provided continue parameter is too old or the resource version has expired")
        if self.status == 503:
            return ApiError(503, "ServiceUnavailable", "the server is currently unable to handle the request", retry_after=self.retry_after)
        return ApiError(self.status, "InternalError", "Internal error occurred: injected fault")


@dataclass(eq=False)
class _WatchStream:
    queue: asyncio.Queue[WatchEvent | None] = field(default_factory=asyncio.Queue)
    stalled: bool = False


@dataclass(frozen=True)
class _Target:
    resource: ResourceType
    namespace: str | None  # None: all namespaces (collection) or a cluster-scoped resource
    name: str | None
    subresource: str | None


def _parse_path(path: str) -> _Target:
    parts = [part for part in path.split("/") if part]
    if len(parts) >= 2 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        raise ApiError(404, "NotFound", "the server could not find the requested resource")
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] != "status":
        namespace, rest = rest[1], rest[2:]
    if not rest or len(rest) > 3:
        raise ApiError(404, "NotFound", "the server could not find the requested resource")
    resource = _RESOURCES_BY_PATH.get((group, version, rest[0]))
    if resource is None or (namespace is not None and not resource.namespaced):
        raise ApiError(404, "NotFound", "the server could not find the requested resource")
    name = rest[1] if len(rest) >= 2 else None
    subresource = rest[2] if len(rest) == 3 else None
    if subresource is not None and (subresource != "status" or not resource.has_status):
        raise ApiError(404, "NotFound", "the server could not find the requested resource")
    if name is not None and resource.namespaced and namespace is None:
        raise ApiError(404, "NotFound", "the server could not find the requested resource")
    return _Target(resource, namespace, name, subresource)


class FakeApiServer:
    """See the module docstring. Use as `async with FakeApiServer() as server:` or start()/stop()."""

    def __init__(
        self,
        *,
        allow_loopback: bool = False,
        history_limit: int = 1000,
        bookmark_interval: float = 60.0,
        default_watch_timeout: float | None = None,
    ) -> None:
        self.allow_loopback = allow_loopback
        self.history_limit = history_limit
        self.bookmark_interval = bookmark_interval
        self.default_watch_timeout = default_watch_timeout
        self.store = Store(allow_loopback=allow_loopback, history_limit=history_limit)
        self.request_log: deque[tuple[str, str]] = deque(maxlen=10000)
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._watches: set[_WatchStream] = set()
        self._faults: list[_Fault] = []

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def open_watches(self) -> int:
        return len(self._watches)

    async def start(self) -> None:
        """Listen on 127.0.0.1: a random port the first time, the same port after a stop."""
        app = web.Application(middlewares=[self._middleware], client_max_size=16 * 1024 * 1024)
        app.router.add_get("/version", self._version)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        if self.port == 0:
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        """Stop listening and end every open watch (clients see the connection close)."""
        self.drop_watches()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def restart(self, *, keep_state: bool = True) -> None:
        """Stop and start again on the same port. `keep_state=False` loses every object, as a
        wiped etcd would; the resourceVersion keeps counting up and all history is compacted, so
        clients resuming a watch get 410 and must relist."""
        await self.stop()
        if not keep_state:
            old = self.store
            self.store = Store(allow_loopback=self.allow_loopback, history_limit=self.history_limit)
            self.store.resource_version = old.resource_version + 1
            self.store.compact()
        await self.start()

    async def __aenter__(self) -> FakeApiServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def write_kubeconfig(self, path: str | Path, namespace: str = "default") -> Path:
        """A kubeconfig for `kubernetes_asyncio.config.load_kube_config`: plain http, no auth."""
        path = Path(path)
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                    "users": [{"name": "fake", "user": {}}],
                    "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": namespace}}],
                    "current-context": "fake",
                },
                indent=2,
            )
        )
        return path

    # -- fault hooks --------------------------------------------------------------------------

    def drop_watches(self) -> None:
        """End every open watch stream now (clean end of the chunked response)."""
        for stream in self._watches:
            stream.queue.put_nowait(None)

    def stall_watches(self) -> None:
        """Every open watch stream goes silent (no events, no bookmarks) but stays connected,
        like a half-open connection; new watches work normally."""
        for stream in self._watches:
            stream.stalled = True

    def fail_next(self, count: int, status: int, *, path_contains: str = "", method: str | None = None, retry_after: int = 1) -> None:
        """The next `count` requests whose path+query contains `path_contains` (and, if given,
        use `method`) fail with `status` (410 Expired, 429 with Retry-After, 503, else 500)."""
        self._faults.append(_Fault(status, count, path_contains, method, retry_after))

    def clear_faults(self) -> None:
        """Forget every pending `fail_next`."""
        self._faults = []

    def compact(self) -> None:
        """Compact history now: resuming a watch or an exact LIST from any older version → 410."""
        self.store.compact()

    # -- HTTP ---------------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.request_log.append((request.method, request.path_qs))
        for fault in self._faults:
            if fault.remaining > 0 and fault.matches(request):
                fault.remaining -= 1
                self._faults = [f for f in self._faults if f.remaining > 0]
                return _error_response(fault.error())
        try:
            return await handler(request)
        except ApiError as error:
            return _error_response(error)

    async def _version(self, request: web.Request) -> web.Response:
        return _json_response({"major": "1", "minor": "28", "gitVersion": "v1.28.0-fake", "platform": "linux/amd64"})

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        target = _parse_path(request.path)
        store, resource = self.store, target.resource
        namespace = target.namespace or ""
        if target.name is None:
            if request.method == "GET":
                selection = Selection(
                    resource,
                    target.namespace,
                    request.query.get("labelSelector"),
                    request.query.get("fieldSelector"),
                )
                if request.query.get("watch") in _TRUE:
                    return await self._watch(request, selection)
                return self._list(request, selection)
            if request.method == "POST" and (target.namespace is not None or not resource.namespaced):
                return _json_response(store.create(resource, namespace, await self._body(request)), 201)
            raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        if request.method == "GET":
            return _json_response(store.get(resource, namespace, target.name))
        if request.method == "PUT":
            body = await self._body(request)
            return _json_response(store.update(resource, namespace, target.name, body, target.subresource))
        if request.method == "PATCH":
            return _json_response(await self._patch(request, target))
        if request.method == "DELETE" and target.subresource is None:
            obj, gone = store.delete(resource, namespace, target.name)
            if not gone:
                return _json_response(obj, 202)
            details = {"name": target.name, "group": resource.group, "kind": resource.plural, "uid": obj["metadata"]["uid"]}
            return _json_response({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details})
        raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")

    async def _body(self, request: web.Request) -> JsonObject:
        try:
            body = json.loads(await request.read())
        except ValueError as error:
            raise ApiError(400, "BadRequest", f"the request body is not valid JSON: {error}") from error
        if not isinstance(body, (dict, list)):
            raise ApiError(400, "BadRequest", "the request body must be a JSON object")
        return body  # type: ignore[return-value]

    async def _patch(self, request: web.Request, target: _Target) -> JsonObject:
        assert target.name is not None
        namespace = target.namespace or ""
        current = self.store.get(target.resource, namespace, target.name)
        patch = await self._body(request)
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
        try:
            if content_type in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
                if not isinstance(patch, dict):
                    raise ApiError(400, "BadRequest", "a merge patch must be a JSON object")
                patched = merge_patch(current, patch)
            elif content_type == "application/json-patch+json":
                patched = json_patch(current, patch)
            else:
                raise ApiError(415, "UnsupportedMediaType", f'the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json')
        except PatchError as error:
            raise ApiError(422, "Invalid", str(error)) from error
        requested = (patch.get("metadata") or {}).get("resourceVersion") if isinstance(patch, dict) else None
        if not requested:
            patched["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        return self.store.update(target.resource, namespace, target.name, patched, target.subresource)

    def _list(self, request: web.Request, selection: Selection) -> web.Response:
        resource_version = request.query.get("resourceVersion", "")
        match = request.query.get("resourceVersionMatch") or ("Exact" if "limit" in request.query else "NotOlderThan")
        if resource_version not in ("", "0") and match == "Exact":
            items = self.store.list_at(selection, _parse_version(resource_version))
        else:
            items = self.store.list(selection)
        resource = selection.resource
        return _json_response(
            {
                "kind": f"{resource.kind}List",
                "apiVersion": resource.api_version,
                "metadata": {"resourceVersion": str(self.store.resource_version)},
                "items": [{k: v for k, v in item.items() if k not in ("kind", "apiVersion")} for item in items],
            }
        )

    async def _watch(self, request: web.Request, selection: Selection) -> web.StreamResponse:
        store = self.store
        timeout = float(request.query["timeoutSeconds"]) if "timeoutSeconds" in request.query else self.default_watch_timeout
        bookmarks = request.query.get("allowWatchBookmarks") in _TRUE
        resource_version = request.query.get("resourceVersion", "")
        stream = _WatchStream()
        initial: list[tuple[str, JsonObject]] = []
        too_old: ApiError | None = None
        # Replay and subscribe in one synchronous step: no write can fall between them.
        if resource_version in ("", "0"):
            initial = [("ADDED", obj) for obj in store.list(selection)]
        else:
            try:
                for event in store.events_since(_parse_version(resource_version)):
                    initial.extend(_translate_event(event, selection))
            except ApiError as error:
                too_old = error
        if too_old is None:
            store.subscribers.add(stream.queue.put_nowait)
            self._watches.add(stream)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        try:
            await response.prepare(request)
            if too_old is not None:
                await response.write(_dumps({"type": "ERROR", "object": too_old.status()}) + b"\n")
            else:
                await self._stream_events(response, stream, selection, initial, timeout, bookmarks)
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client went away; a cancelled handler (handler_cancellation) unwinds through finally
        finally:
            store.subscribers.discard(stream.queue.put_nowait)
            self._watches.discard(stream)
        return response

    async def _stream_events(
        self,
        response: web.StreamResponse,
        stream: _WatchStream,
        selection: Selection,
        initial: list[tuple[str, JsonObject]],
        timeout: float | None,
        bookmarks: bool,
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout is not None else None
        next_bookmark = loop.time() + self.bookmark_interval
        pending = list(initial)
        while True:
            if not stream.stalled and pending:
                await response.write(b"".join(_dumps({"type": t, "object": o}) + b"\n" for t, o in pending))
                pending = []
            now = loop.time()
            if deadline is not None and now >= deadline:
                return
            if bookmarks and now >= next_bookmark and not stream.stalled and stream.queue.empty():
                resource = selection.resource
                bookmark = {"kind": resource.kind, "apiVersion": resource.api_version,
                            "metadata": {"resourceVersion": str(self.store.resource_version)}}
                await response.write(_dumps({"type": "BOOKMARK", "object": bookmark}) + b"\n")
                next_bookmark = now + self.bookmark_interval
            wait = min(t for t in (deadline, next_bookmark if bookmarks else None, now + 3600.0) if t is not None) - now
            try:
                event = await asyncio.wait_for(stream.queue.get(), max(wait, 0.0))
            except asyncio.TimeoutError:
                continue
            if event is None:
                return
            pending.extend(_translate_event(event, selection))


def _parse_version(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ApiError(400, "BadRequest", f'invalid resource version "{text}"') from None


def _translate_event(event: WatchEvent, selection: Selection) -> list[tuple[str, JsonObject]]:
    """What one write looks like to a watch with this selection (selector transitions included)."""
    if event.resource is not selection.resource:
        return []
    matched_before = selection.matches(event.previous)
    matches_now = selection.matches(event.object)
    if event.type == "DELETED":
        return [("DELETED", event.object)] if matched_before else []
    if matches_now:
        return [("MODIFIED" if matched_before else "ADDED", event.object)]
    return [("DELETED", event.object)] if matched_before else []


async def _serve_forever(arguments: argparse.Namespace) -> None:
    server = FakeApiServer(allow_loopback=arguments.allow_loopback, bookmark_interval=arguments.bookmark_interval)
    server.port = arguments.port
    await server.start()
    if arguments.kubeconfig:
        server.write_kubeconfig(arguments.kubeconfig)
    print(server.url, flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the fake kube-apiserver on 127.0.0.1 (prints its URL).")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--kubeconfig", help="write a kubeconfig for this server to this path")
    parser.add_argument("--allow-loopback", action="store_true", help="accept 127.0.0.0/8 EndpointSlice addresses (test-only)")
    parser.add_argument("--bookmark-interval", type=float, default=60.0)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_forever(parser.parse_args()))
