"""`ingress-proxy serve | check | doctor`."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import uvloop

from config.model import Address, Listeners
from config.routes_file import LoadedRoutes, RoutesFileError, load_routes_file

if TYPE_CHECKING:
    from ingress_watch.snapshot import Snapshot  # imported lazily: standalone mode never loads the Kubernetes client

LOG = logging.getLogger("ingress_proxy")


def _configure_logging(level: str, access_log: bool) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    access = logging.getLogger("ingress_proxy.access")
    access.propagate = False
    if access_log:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
        access.setLevel(logging.INFO)
    else:
        access.setLevel(logging.CRITICAL)


def _check(args: argparse.Namespace) -> int:
    try:
        load_routes_file(args.routes)
    except RoutesFileError as error:
        print(error, file=sys.stderr)
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
    from config.model import EngineKey, KeySource
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
        keys = [certificate.key for certificate in configuration.certificates if isinstance(certificate.key, EngineKey)]
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


async def _serve_kubernetes(args: argparse.Namespace) -> int:
    from ingress_watch.controller import ControllerSettings, KubernetesSource, load_client_configuration
    from ingress_watch.leader import LeaderSettings
    from ingress_watch.status import PublishSettings
    from ingress_watch.translate import TranslateOptions
    from proxy.server import run_proxy

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
    client_configuration = await load_client_configuration(args.kubeconfig)
    return await run_proxy(listeners, KubernetesSource(client_configuration, settings))


def _serve(args: argparse.Namespace) -> int:
    _configure_logging(args.log_level, args.access_log)
    if args.kubernetes:
        if args.workers != 1:
            raise SystemExit("--workers: Kubernetes mode runs one process per pod; scale with replicas instead")
        return uvloop.run(_serve_kubernetes(args))
    if args.routes is None:
        raise SystemExit("serve: give --routes FILE (standalone) or --kubernetes")
    try:
        loaded = load_routes_file(args.routes)
    except RoutesFileError as error:
        print(error, file=sys.stderr)
        return 1
    if args.workers == 1:
        return _serve_routes_file_worker(args.routes, loaded, None, True, {})
    from proxy.server import ListenerError, bind_listeners
    from proxy.workers import run_workers

    try:
        sockets = bind_listeners(loaded.listeners)  # before fork: the workers inherit them (proxy/workers.py)
    except ListenerError as error:
        print(error, file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="ingress-proxy-metrics-") as metrics_directory:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_directory  # before prometheus_client is imported
        return run_workers(
            args.workers, lambda index, keys: _serve_routes_file_worker(args.routes, loaded, keys, index == 0, sockets)
        )


def _serve_routes_file_worker(
    path: Path, loaded: LoadedRoutes, ticket_keys: bytes | None, with_admin: bool, sockets: dict[str, socket.socket]
) -> int:
    from config.file_source import RoutesFileSource
    from proxy.server import run_proxy

    return uvloop.run(run_proxy(loaded.listeners, RoutesFileSource(path, loaded), ticket_keys, with_admin, sockets))


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ingress-proxy", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument("--routes", type=Path, help="routes file (YAML): standalone mode")
    serve.add_argument("--workers", type=int, default=1, help="processes sharing the listeners (bound once, inherited)")
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
