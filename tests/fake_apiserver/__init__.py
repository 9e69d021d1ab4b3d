"""A wire-faithful fake kube-apiserver for tests (see server.py for what it does and how it deviates)."""

from tests.fake_apiserver.server import FakeApiServer

__all__ = ["FakeApiServer"]
