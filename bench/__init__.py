"""Side-by-side benchmark: ingress-proxy against HAProxy and nginx on loopback.

Theory of operation
-------------------
One run starts a backend (a second nginx serving a 2-byte body and a 1 MiB file from tmpfs) and
then, row by row, starts each proxy under test with the same certificates and equivalent settings,
measures it with a load generator, and stops it again. Each proxy is restarted per row so every
row starts from a clean process (the idle-connection RSS row needs that, and settings such as the
key type or resumption differ per row).

CPU placement: the machine has two cores. The proxy under test runs on core 0 (`taskset -c 0`);
the load generator, the backend and this process run on core 1. So a figure is what one core of
proxy buys; the proxy's own CPU use and core 1's busy share are recorded per measurement, and a
figure whose proxy was not CPU-bound while core 1 was saturated is flagged as generator-bound.
The `--workers 2` rows give each proxy both cores and share them with the generator: they compare
the three proxies with each other, not with the one-core rows.

Correctness: before a measurement each proxy answers one real HTTPS request per body size with the
expected status and length; during it, socket errors, non-2xx responses and short reads are counted
and a row with any of them is flagged.
"""
