"""`ingress-proxy serve | check | doctor`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import uvloop

from config.routes_file import RoutesFileError, load_routes_file

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


def _doctor(args: argparse.Namespace) -> int:
    from config.model import EngineKey
    from proxy.doctor import run_doctor

    settings = None
    keys = []
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


def _serve(args: argparse.Namespace) -> int:
    _configure_logging(args.log_level, args.access_log)
    from config.file_source import RoutesFileSource
    from proxy.server import run_proxy

    try:
        loaded = load_routes_file(args.routes)
    except RoutesFileError as error:
        print(error, file=sys.stderr)
        return 1
    return uvloop.run(run_proxy(loaded.listeners, RoutesFileSource(args.routes, loaded)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ingress-proxy", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument("--routes", type=Path, required=True, help="routes file (YAML)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True, help="one line per request on stdout")
    check = commands.add_parser("check", help="validate a routes file and exit")
    check.add_argument("--routes", type=Path, required=True)
    doctor = commands.add_parser("doctor", help="report OpenSSL, engine and key status")
    doctor.add_argument("--routes", type=Path)
    args = parser.parse_args(argv)
    if args.command == "check":
        return _check(args)
    if args.command == "doctor":
        return _doctor(args)
    return _serve(args)


if __name__ == "__main__":
    sys.exit(main())
