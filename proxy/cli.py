"""`ingress-proxy serve | check | doctor`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import uvloop


def _refuse_unusable_openssl_modules() -> None:
    """cryptography loads OpenSSL's `legacy` provider when it is imported and dies with a traceback
    if OPENSSL_MODULES names a folder without it (a way users try to reach a provider's module)."""
    folder = os.environ.get("OPENSSL_MODULES")
    if folder and not os.path.isfile(os.path.join(folder, "legacy.so")):
        raise SystemExit(
            f"OPENSSL_MODULES={folder} has no legacy.so, which the crypto library loads at start; fix: unset "
            "OPENSSL_MODULES and name the provider's file in tls.providers[].module (or set tls.provider_path)"
        )


_refuse_unusable_openssl_modules()  # before anything imports cryptography

from config.model import Address, Listeners  # noqa: E402
from config.routes_file import LoadedRoutes, RoutesFileError, load_routes_file  # noqa: E402
from proxy.access_log import ACCESS_LOG  # noqa: E402

if TYPE_CHECKING:
    from kubernetes_asyncio import client

    from ingress_watch.controller import ControllerSettings

if TYPE_CHECKING:
    from ingress_watch.snapshot import Snapshot  # imported lazily: standalone mode never loads the Kubernetes client
    from proxy.workers import WorkerStart  # imported lazily: after PROMETHEUS_MULTIPROC_DIR is set

LOG = logging.getLogger("ingress_proxy")
_HEADER_LOGGING_LIBRARIES = ("hpack", "h2")


def _configure_logging(level: str, access_log: bool) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for library in _HEADER_LOGGING_LIBRARIES:  # their debug lines print every header, credentials included
        logging.getLogger(library).setLevel(max(logging.WARNING, logging.getLogger().level))
    if access_log:
        ACCESS_LOG.enable(sys.stdout)


def _check(args: argparse.Namespace) -> int:
    from config.crypto import check_crypto

    try:
        loaded = load_routes_file(args.routes)
    except RoutesFileError as error:
        print(error, file=sys.stderr)
        return 1
    problems = check_crypto(loaded.configuration, str(args.routes))  # asks tokens and engines
    if problems:
        print(RoutesFileError(problems), file=sys.stderr)
        return 1
    print(f"{args.routes}: OK")
    return 0


async def _list_cluster(args: argparse.Namespace) -> Snapshot:
    """LIST (never WATCH, never write) what the controller would watch, as one Snapshot."""
    import json

    from kubernetes_asyncio import client

    from ingress_watch.cache import ObjectCache
    from ingress_watch.controller import load_client_configuration
    from ingress_watch.watch import watch_targets

    targets = watch_targets(args.watch_namespace, _namespaced(args.configmap, "--configmap"))
    cache = ObjectCache(tuple(target.kind for target in targets))
    async with client.ApiClient(await load_client_configuration(args.kubeconfig)) as api_client:
        for target in targets:
            selector = {"field_selector": target.field_selector} if target.field_selector else {}
            response = await getattr(target.api(api_client), target.list_method)(*target.args, **selector, _preload_content=False)
            try:
                cache.replace(target.kind, json.loads(await response.read()).get("items") or [])
            finally:
                response.release()
    return cache.snapshot()


def _migrate(args: argparse.Namespace) -> int:
    import json

    from ingress_watch.migration import migration_report, render_text
    from ingress_watch.translate import TranslateOptions

    options = TranslateOptions(
        ingress_class=args.ingress_class,
        controller_class=args.controller_class,
        watch_ingress_without_class=args.watch_ingress_without_class,
        watch_namespace=args.watch_namespace,
        default_ssl_certificate=_namespaced(args.default_ssl_certificate, "--default-ssl-certificate"),
    )
    report = migration_report(uvloop.run(_list_cluster(args)), options)
    print(json.dumps(report, indent=2) if args.json else render_text(report))
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from config.model import KeySource, PemKey
    from proxy.doctor import run_doctor

    settings = None
    keys: list[KeySource] = []
    if args.routes is not None:
        try:
            loaded = load_routes_file(args.routes)
        except RoutesFileError as error:
            print(error, file=sys.stderr)
            return 1
        configuration = loaded.configuration
        settings = configuration.crypto
        keys = [certificate.key for certificate in configuration.certificates if not isinstance(certificate.key, PemKey)]
    lines, ok = run_doctor(settings, keys)
    for line in lines:
        print(line)
    return 0 if ok else 1


def _namespaced(value: str | None, flag: str) -> tuple[str, str] | None:
    if value is None:
        return None
    namespace, slash, name = value.partition("/")
    if not slash or not namespace or not name:
        raise SystemExit(f"{flag}: expected NAMESPACE/NAME, got {value!r}")
    return namespace, name


def _address(value: str, flag: str) -> Address:
    host, colon, port = value.rpartition(":")
    if not colon or not port.isdigit():
        raise SystemExit(f"{flag}: expected HOST:PORT, got {value!r}")
    return Address(host.strip("[]"), int(port))


def _kubernetes_settings(args: argparse.Namespace) -> tuple[Listeners, ControllerSettings]:
    from ingress_watch.controller import ControllerSettings
    from ingress_watch.leader import LeaderSettings
    from ingress_watch.status import PublishSettings
    from ingress_watch.translate import TranslateOptions

    publish = None
    if args.publish_service or args.publish_status_address:
        publish = PublishSettings(
            addresses=tuple(args.publish_status_address or ()),
            service=_namespaced(args.publish_service, "--publish-service"),
        )
    settings = ControllerSettings(
        translate=TranslateOptions(
            ingress_class=args.ingress_class,
            controller_class=args.controller_class,
            watch_ingress_without_class=args.watch_ingress_without_class,
            watch_namespace=args.watch_namespace,
            default_ssl_certificate=_namespaced(args.default_ssl_certificate, "--default-ssl-certificate"),
        ),
        configmap=_namespaced(args.configmap, "--configmap"),
        publish=publish,
        leader=LeaderSettings(namespace=os.environ.get("POD_NAMESPACE", "default"), lease_name=args.election_id),
    )
    listeners = Listeners(
        https=_address(args.https_address, "--https-address"),
        http=_address(args.http_address, "--http-address") if args.http_address else None,
        admin=_address(args.admin_address, "--admin-address") if args.admin_address else None,
    )
    return listeners, settings


async def _serve_kubernetes(args: argparse.Namespace) -> int:
    from ingress_watch.controller import KubernetesSource, load_client_configuration
    from proxy.server import run_proxy

    listeners, settings = _kubernetes_settings(args)
    client_configuration = await load_client_configuration(args.kubeconfig)
    return await run_proxy(listeners, KubernetesSource(client_configuration, settings))


def _serve_kubernetes_workers(args: argparse.Namespace) -> int:
    """One watcher and `--workers` data-plane processes, fed over proxy/generation_feed.py."""
    with tempfile.TemporaryDirectory(prefix="ingress-proxy-") as private:  # mode 0700: the feed's only door
        metrics_directory = Path(private) / "metrics"
        metrics_directory.mkdir()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_directory)  # before prometheus_client is imported
        from ingress_watch.controller import load_client_configuration
        from proxy.generation_feed import FEED_SOCKET_NAME, FeedSource, bind_feed
        from proxy.server import ListenerError, bind_listeners, run_proxy
        from proxy.workers import run_workers

        listeners, settings = _kubernetes_settings(args)
        # In the master, before forking, so that an unreadable kubeconfig is one error, not a watcher
        # restarting forever; the loop it runs on is closed again before any fork.
        client_configuration = asyncio.run(load_client_configuration(args.kubeconfig))
        try:
            sockets = bind_listeners(listeners)  # before fork: the workers inherit them (proxy/workers.py)
        except ListenerError as error:
            print(error, file=sys.stderr)
            return 1
        feed = bind_feed(Path(private))
        feed_path = Path(private) / FEED_SOCKET_NAME

        def run_worker(start: WorkerStart) -> int:
            feed.close()
            source = FeedSource(feed_path)
            return uvloop.run(run_proxy(listeners, source, start.ticket_keys, start.index == 0, sockets, start.key_loading))

        def run_watcher() -> int:
            for sock in sockets.values():
                sock.close()
            return uvloop.run(_watch(client_configuration, settings, feed))

        return run_workers(args.workers, run_worker, run_watcher)


async def _watch(client_configuration: client.Configuration, settings: ControllerSettings, feed: socket.socket) -> int:
    """The watcher process: the Kubernetes source publishing into the feed, until SIGTERM."""
    from ingress_watch.controller import KubernetesSource
    from proxy.generation_feed import FeedServer

    source = KubernetesSource(client_configuration, settings)
    sink = FeedServer(on_problems=source.report_build_problems)
    tasks = [asyncio.create_task(sink.serve(feed), name="feed"), asyncio.create_task(source.run(sink), name="watch")]

    def stop() -> None:
        for task in tasks:
            task.cancel()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop)
    loop.add_signal_handler(signal.SIGHUP, lambda: LOG.info("SIGHUP: nothing to reload, Kubernetes changes apply as they come"))
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    stop()
    results = await asyncio.gather(*tasks, return_exceptions=True)  # cancelled: the Lease is released
    errors = [result for result in results if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError)]
    for error in errors:
        LOG.error("the watcher stopped", exc_info=error)
    return 2 if errors else 0


def _serve(args: argparse.Namespace) -> int:
    _configure_logging(args.log_level, args.access_log)
    if args.kubernetes:
        if args.workers == 1:
            return uvloop.run(_serve_kubernetes(args))
        return _serve_kubernetes_workers(args)
    if args.routes is None:
        raise SystemExit("serve: give --routes FILE (standalone) or --kubernetes")
    try:
        loaded = load_routes_file(args.routes)
    except RoutesFileError as error:
        print(error, file=sys.stderr)
        return 1
    if args.workers == 1:
        return _serve_routes_file_worker(args.routes, loaded, None, {})
    with tempfile.TemporaryDirectory(prefix="ingress-proxy-metrics-") as metrics_directory:
        # Before prometheus_client is imported (proxy.server imports the metrics), or every worker
        # keeps its samples to itself and /metrics shows only the admin worker's.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_directory
        from proxy.server import ListenerError, bind_listeners
        from proxy.workers import run_workers

        try:
            sockets = bind_listeners(loaded.listeners)  # before fork: the workers inherit them (proxy/workers.py)
        except ListenerError as error:
            print(error, file=sys.stderr)
            return 1
        return run_workers(args.workers, lambda start: _serve_routes_file_worker(args.routes, loaded, start, sockets))


def _serve_routes_file_worker(
    path: Path, loaded: LoadedRoutes, start: WorkerStart | None, sockets: dict[str, socket.socket]
) -> int:
    """One process serving the routes file: the only one (`start` None), or a --workers worker."""
    from config.file_source import RoutesFileSource
    from proxy.server import run_proxy

    source = RoutesFileSource(path, loaded)
    if start is None:
        return uvloop.run(run_proxy(loaded.listeners, source))
    return uvloop.run(run_proxy(loaded.listeners, source, start.ticket_keys, start.index == 0, sockets, start.key_loading))


def _add_kubernetes_arguments(serve: argparse.ArgumentParser) -> None:
    group = serve.add_argument_group("Kubernetes Ingress controller mode")
    group.add_argument("--kubernetes", action="store_true", help="watch Ingresses instead of a routes file")
    group.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster service account)")
    group.add_argument("--ingress-class", default="ingress-proxy", help="legacy kubernetes.io/ingress.class value")
    group.add_argument("--controller-class", default="ingress-proxy.dev/controller", help="IngressClass spec.controller")
    group.add_argument("--watch-namespace", help="only this namespace (default: all)")
    group.add_argument("--watch-ingress-without-class", action="store_true", help="also serve class-less Ingresses")
    group.add_argument("--configmap", metavar="NS/NAME", help="settings ConfigMap (ssl-engine, timeouts, ...)")
    group.add_argument("--default-ssl-certificate", metavar="NS/NAME", help="TLS Secret for unknown SNI")
    group.add_argument("--publish-service", metavar="NS/NAME", help="write this Service's address to Ingress status")
    group.add_argument("--publish-status-address", action="append", metavar="ADDR", help="address for Ingress status")
    group.add_argument("--election-id", default="ingress-proxy-leader", help="Lease name for leader election")
    group.add_argument("--https-address", default="0.0.0.0:8443")
    group.add_argument("--http-address", default="0.0.0.0:8080", help="empty to disable")
    group.add_argument("--admin-address", default="0.0.0.0:9100", help="empty to disable")


def _worker_count(text: str) -> int:
    """`--workers`: a whole number ≥ 1 (0 would start no process and serve nothing)."""
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give 1 or more") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"{count} serves nothing; give 1 or more (one per core you want used)")
    return count


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ingress-proxy", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument("--routes", type=Path, help="routes file (YAML): standalone mode")
    serve.add_argument(
        "--workers", type=_worker_count, default=1, help="processes sharing the listeners (bound once, inherited)"
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True, help="one line per request on stdout")
    _add_kubernetes_arguments(serve)
    check = commands.add_parser("check", help="validate a routes file and exit")
    check.add_argument("--routes", type=Path, required=True)
    migrate = commands.add_parser(
        "migrate", help="read-only: what would be served from this cluster's Ingresses, annotation by annotation"
    )
    migrate.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster service account)")
    migrate.add_argument("--ingress-class", default="ingress-proxy", help="legacy kubernetes.io/ingress.class value")
    migrate.add_argument("--controller-class", default="ingress-proxy.dev/controller", help="IngressClass spec.controller")
    migrate.add_argument("--watch-namespace", help="only this namespace (default: all)")
    migrate.add_argument("--watch-ingress-without-class", action="store_true", help="also count class-less Ingresses")
    migrate.add_argument("--configmap", metavar="NS/NAME", help="the settings ConfigMap the controller would read")
    migrate.add_argument("--default-ssl-certificate", metavar="NS/NAME")
    migrate.add_argument("--json", action="store_true", help="the same report as JSON")
    doctor = commands.add_parser("doctor", help="report OpenSSL, engine and key status")
    doctor.add_argument("--routes", type=Path)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check":
        return _check(args)
    if args.command == "doctor":
        return _doctor(args)
    if args.command == "migrate":
        return _migrate(args)
    return _serve(args)


if __name__ == "__main__":
    sys.exit(main())
