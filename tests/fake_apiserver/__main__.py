"""`python -m tests.fake_apiserver --kubeconfig kc.json`: run the fake API server as a subprocess."""

from tests.fake_apiserver.server import main

main()
