"""`KubernetesSource`: the Kubernetes route source (watch → cache → debounce → translate → publish).

Theory of operation
-------------------
One `KindWatcher` per kind keeps an `ObjectCache` current and calls `_changed(kind)` after every
change. The rebuild loop wakes on the first change, then waits for `debounce` seconds of quiet —
never more than `max_delay` after that first change — so a burst (a `kubectl apply` of twenty
objects, a relist) costs one rebuild. Nothing happens until every kind has completed its initial
LIST. Then, for the kinds changed since the last rebuild:

* none (a relist that found what we had): nothing;
* only EndpointSlices, after a first full build: the fast path — `resolve_endpoints` re-reads
  the endpoints of the backends already published and `sink.update_endpoints` is called for the
  ones that differ; routes and TLS contexts are untouched;
* anything else: `translate(snapshot)`; the Configuration is published only if it differs from
  the one the sink holds (our own status writes, for instance, change Ingresses but not routes).
  When the translation named other header ConfigMaps than the cache keeps (`NamedConfigMaps`),
  nothing is published: the ConfigMap watch is restarted with the new names (a fresh LIST, and
  no publishing until it completes), and the rebuild it triggers sees them — a table without
  them, or a "not found" Event for a ConfigMap that exists, never goes out.

Problems (from translation and from the sink's build) are logged once when they appear, and each
one located on an Ingress becomes a Kubernetes Event (type Warning) on that Ingress; a problem
that goes away and comes back is reported again. After each rebuild the Ingresses we claimed go to
the status writer, which writes only while this replica leads (leader.py). `generation` counts
finished rebuild passes; tests await `wait_for_generation` instead of sleeping.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import aiohttp
from kubernetes_asyncio import client, config
from prometheus_client import Gauge, Histogram

from config.model import Configuration, Problem
from config.source import ConfigurationSink
from ingress_watch.cache import JsonObject, Kind, ObjectCache, object_key
from ingress_watch.leader import LeaderElector, LeaderSettings
from ingress_watch.snapshot import Snapshot
from ingress_watch.status import PublishSettings, StatusWriter
from ingress_watch.translate import TranslateOptions, resolve_endpoints, translate
from ingress_watch.watch import KindWatcher, NamedConfigMaps, WatchSettings, WatchTarget, watch_targets

logger = logging.getLogger(__name__)

WATCHED_OBJECTS = Gauge("ingress_proxy_kubernetes_watched_objects", "Objects in the watch cache, by kind", ["kind"])
TRANSLATION_PROBLEMS = Gauge("ingress_proxy_kubernetes_translation_problems", "Problems found in the last full rebuild")
REBUILD_SECONDS = Histogram(
    "ingress_proxy_kubernetes_rebuild_seconds",
    "Time to rebuild and publish, by path (full = translate, endpoints = EndpointSlice fast path)",
    ["path"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
EVENT_TO_SERVED_SECONDS = Histogram(
    "ingress_proxy_kubernetes_event_to_served_seconds",
    "From the first watch event of a batch to its configuration reaching the data plane",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)

PROBLEM_EVENT_REASON = "IngressProblem"


@dataclass(frozen=True)
class ControllerSettings:
    translate: TranslateOptions = TranslateOptions()
    configmap: tuple[str, str] | None = None  # (namespace, name) of the settings ConfigMap
    watch: WatchSettings = WatchSettings()
    debounce: float = 0.05
    max_delay: float = 1.0
    publish: PublishSettings | None = None  # None: never write Ingress status (no leader election)
    leader: LeaderSettings = field(default_factory=LeaderSettings)
    component: str = "ingress-proxy"  # Event source


async def load_client_configuration(kubeconfig: str | None = None, context: str | None = None) -> client.Configuration:
    """In-cluster service account when running in a Pod and no kubeconfig is named, else a kubeconfig."""
    configuration = client.Configuration()
    if kubeconfig is None and "KUBERNETES_SERVICE_HOST" in os.environ:
        config.load_incluster_config(client_configuration=configuration)
    else:
        await config.load_kube_config(
            config_file=kubeconfig, context=context, client_configuration=configuration, persist_config=False
        )
    return configuration


class KubernetesSource:
    """A `config.source.RouteSource` fed by the Kubernetes API."""

    def __init__(self, configuration: client.Configuration, settings: ControllerSettings = ControllerSettings()) -> None:
        self._client_configuration = configuration
        self.settings = settings
        self.named_configmaps = NamedConfigMaps()
        kinds = tuple(target.kind for target in self._targets())
        self.cache = ObjectCache(kinds)
        self.generation = 0
        self.status_writer: StatusWriter | None = None
        self.elector: LeaderElector | None = None
        self._generation_advanced = asyncio.Event()
        self._dirty = asyncio.Event()
        self._first_change_at: float | None = None
        self._published: Configuration | None = None
        self._build_problems: tuple[Problem, ...] = ()
        self._reported_with: tuple[tuple[Problem, ...], Snapshot] | None = None  # last translation problems + snapshot
        self._reported: set[Problem] = set()
        self._event_queue: asyncio.Queue[tuple[JsonObject, str]] = asyncio.Queue()
        self._watches: dict[Kind, asyncio.Task[None]] = {}
        self._start_watch: Callable[[WatchTarget], None] | None = None  # set while `run` runs

    def _targets(self) -> tuple[WatchTarget, ...]:
        return watch_targets(self.settings.translate.watch_namespace, self.settings.configmap, self.named_configmaps)

    @property
    def is_leader(self) -> bool:
        return self.elector is not None and self.elector.is_leader

    async def wait_for_generation(self, minimum: int) -> int:
        while self.generation < minimum:
            await self._generation_advanced.wait()
        return self.generation

    async def run(self, sink: ConfigurationSink) -> None:
        async with client.ApiClient(self._client_configuration) as api_client:
            async with asyncio.TaskGroup() as tasks:

                def start_watch(target: WatchTarget) -> None:
                    watcher = KindWatcher(api_client, target, self.cache, self._changed, self.settings.watch)
                    self._watches[target.kind] = tasks.create_task(watcher.run(), name=f"watch {target.describe()}")

                self._start_watch = start_watch
                for target in self._targets():
                    start_watch(target)
                tasks.create_task(self._rebuild_loop(sink), name="rebuild")
                tasks.create_task(self._post_events(api_client), name="events")
                if self.settings.publish is not None:
                    self.status_writer = StatusWriter(api_client, self.settings.publish)
                    self.elector = LeaderElector(api_client, self.settings.leader, self.status_writer.run)
                    tasks.create_task(self.elector.run(), name="leader election")

    # -- rebuilds -------------------------------------------------------------------------------

    def _changed(self, kind: Kind) -> None:
        if self._first_change_at is None:
            self._first_change_at = time.monotonic()
        self._dirty.set()

    async def _rebuild_loop(self, sink: ConfigurationSink) -> None:
        while True:
            await self._dirty.wait()
            first_change = self._first_change_at if self._first_change_at is not None else time.monotonic()
            while True:
                self._dirty.clear()
                remaining = first_change + self.settings.max_delay - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(self._dirty.wait(), min(self.settings.debounce, remaining))
                except asyncio.TimeoutError:
                    break
            self._dirty.clear()
            if not self.cache.synced:
                continue
            self._first_change_at = None
            try:
                if not await self._rebuild(sink, first_change):
                    continue  # deferred until the relist it started completes: not a finished pass
            except Exception:  # a translator bug must not stop the watches: keep serving the last configuration
                logger.exception("rebuilding the configuration failed; still serving the previous one")
            self.generation += 1
            self._generation_advanced.set()
            self._generation_advanced = asyncio.Event()

    async def _rebuild(self, sink: ConfigurationSink, first_change: float) -> bool:
        """Translate off the event loop (it is pure and takes ~60 µs per Ingress), publish on it.
        False: deferred (the header ConfigMaps named changed; see the theory).

        With thousands of Ingresses a translation takes a few hundred milliseconds; in a worker
        thread the loop keeps serving meanwhile (the GIL is handed back every few milliseconds).
        """
        changed = self.cache.take_changed()
        for kind in self.cache.kinds:
            WATCHED_OBJECTS.labels(kind.value).set(self.cache.count(kind))
        if not changed:
            return True
        snapshot = self.cache.snapshot()
        started = time.perf_counter()
        if self._published is not None and changed == {Kind.ENDPOINT_SLICE}:
            served = await self._update_endpoints(sink, snapshot, self._published)
            REBUILD_SECONDS.labels("endpoints").observe(time.perf_counter() - started)
        else:
            translation = await asyncio.to_thread(translate, snapshot, self.settings.translate)
            if translation.named_configmaps != self.named_configmaps.wanted:
                self._relist_named_configmaps(translation.named_configmaps)
                return False
            served = translation.configuration != self._published
            if served:
                self._build_problems = sink.publish(translation.configuration)
                self._published = translation.configuration
            REBUILD_SECONDS.labels("full").observe(time.perf_counter() - started)
            self._reported_with = (translation.problems, snapshot)
            self._report(translation.problems + self._build_problems, snapshot)
            if self.status_writer is not None:
                self.status_writer.update(snapshot, frozenset(translation.claimed_ingresses))
        if served:
            EVENT_TO_SERVED_SECONDS.observe(time.monotonic() - first_change)
        return True

    def _relist_named_configmaps(self, wanted: frozenset[tuple[str, str]]) -> None:
        """Keep `wanted` from now on: restart the ConfigMap watch, whose LIST replaces what the cache
        holds of that kind (a task cancelled mid-LIST never applies it: `replace` runs between awaits)."""
        self.named_configmaps.wanted = wanted
        self.cache.unlist(Kind.NAMED_CONFIGMAP)
        self._watches.pop(Kind.NAMED_CONFIGMAP).cancel()
        assert self._start_watch is not None  # rebuilds run inside `run`
        self._start_watch(next(target for target in self._targets() if target.kind is Kind.NAMED_CONFIGMAP))

    async def _update_endpoints(self, sink: ConfigurationSink, snapshot: Snapshot, published: Configuration) -> bool:
        old_backends = published.routes.backends
        new_backends = await asyncio.to_thread(resolve_endpoints, snapshot, old_backends)
        updated = False
        for old, new in zip(old_backends, new_backends):
            if old.endpoints != new.endpoints:
                sink.update_endpoints(new.name, new.endpoints)
                updated = True
        self._published = replace(published, routes=replace(published.routes, backends=new_backends))
        return updated

    # -- problems -------------------------------------------------------------------------------

    def report_build_problems(self, problems: tuple[Problem, ...]) -> None:
        """Problems a sink found after `publish` returned (--workers: each worker builds on its own)."""
        self._build_problems = problems
        if self._reported_with is not None:
            translation_problems, snapshot = self._reported_with
            self._report(translation_problems + problems, snapshot)

    def _report(self, problems: tuple[Problem, ...], snapshot: Snapshot) -> None:
        current = set(problems)
        TRANSLATION_PROBLEMS.set(len(current))
        ingresses = {object_key(ingress): ingress for ingress in snapshot.ingresses}
        for problem in sorted(current - self._reported, key=lambda p: (p.location, p.message)):
            logger.warning("%s", problem)
            kind, _, reference = problem.location.partition(" ")
            namespace, _, name = reference.partition("/")
            if kind == "Ingress" and (namespace, name) in ingresses:
                self._event_queue.put_nowait((ingresses[(namespace, name)], problem.message))
        self._reported = current

    async def _post_events(self, api_client: client.ApiClient) -> None:
        core = client.CoreV1Api(api_client)
        while True:
            ingress, message = await self._event_queue.get()
            metadata = ingress.get("metadata") or {}
            now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            event = {
                "metadata": {"generateName": f"{metadata.get('name')}.", "namespace": metadata.get("namespace")},
                "involvedObject": {
                    "kind": "Ingress",
                    "apiVersion": "networking.k8s.io/v1",
                    "namespace": metadata.get("namespace"),
                    "name": metadata.get("name"),
                    "uid": metadata.get("uid"),
                    "resourceVersion": metadata.get("resourceVersion"),
                },
                "type": "Warning",
                "reason": PROBLEM_EVENT_REASON,
                "message": message,
                "source": {"component": self.settings.component},
                "reportingComponent": self.settings.component,
                "reportingInstance": self.settings.leader.identity,
                "firstTimestamp": now,
                "lastTimestamp": now,
                "count": 1,
            }
            try:
                # The client accepts a plain JSON body at run time; its stubs only name the model class.
                await core.create_namespaced_event(metadata.get("namespace"), event)  # type: ignore[arg-type]
            except (client.ApiException, aiohttp.ClientError, asyncio.TimeoutError, OSError) as error:
                logger.warning("could not record an Event on Ingress %s/%s: %s", metadata.get("namespace"), metadata.get("name"), error)
