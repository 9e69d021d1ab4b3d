"""`make run`: certificates, two echo backends and the proxy on examples/routes.yaml, in one command.

Writes examples/certs/demo.{pem,key} (self-signed ECDSA P-256 for localhost, demo.localhost and
*.demo.localhost) unless they exist, starts echo backends on 127.0.0.1:9001 and :9002 (each
answers with what it received, so you can see the X-Forwarded-* headers the proxy adds), then
runs `ingress-proxy serve --routes examples/routes.yaml` until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

from aiohttp import web

from config.tls_material import self_signed_certificate

EXAMPLES = Path(__file__).resolve().parent
CERTS = EXAMPLES / "certs"
NAMES = ("localhost", "demo.localhost", "*.demo.localhost")
BACKEND_PORTS = (9001, 9002)


def write_demo_certificate() -> None:
    if (CERTS / "demo.pem").exists() and (CERTS / "demo.key").exists():
        return
    CERTS.mkdir(exist_ok=True)
    chain_pem, key_pem = self_signed_certificate("ingress-proxy demo", NAMES, ["127.0.0.1"])
    (CERTS / "demo.pem").write_bytes(chain_pem)
    key_path = CERTS / "demo.key"
    key_path.touch(mode=0o600)
    key_path.write_bytes(key_pem)


async def start_echo_backend(port: int) -> web.AppRunner:
    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        seen = {"backend": f"127.0.0.1:{port}", "method": request.method, "path": request.path_qs,
                "headers": dict(request.headers), "body_bytes": len(body)}
        return web.Response(text=json.dumps(seen, indent=2) + "\n", content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def main() -> int:
    write_demo_certificate()
    runners = [await start_echo_backend(port) for port in BACKEND_PORTS]
    proxy = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("ingress-proxy")), "serve", "--routes", str(EXAMPLES / "routes.yaml")
    )
    print(
        "\ningress-proxy is starting on https://127.0.0.1:8443 (admin http://127.0.0.1:9100). Try:\n"
        "  curl -k https://localhost:8443/api/users\n"
        "  curl -k --resolve api.demo.localhost:8443:127.0.0.1 https://api.demo.localhost:8443/\n"
        "  curl -i http://demo.localhost:8080/          # 308 to https\n"
        "  curl http://127.0.0.1:9100/metrics\n"
        "Edit examples/routes.yaml to reload it live. Ctrl-C stops everything.\n",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    waiter = asyncio.create_task(proxy.wait())
    await asyncio.wait([waiter, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    if proxy.returncode is None:
        proxy.send_signal(signal.SIGTERM)
    code = await waiter
    for runner in runners:
        await runner.cleanup()
    return code


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
