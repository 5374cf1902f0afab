"""Load tests: Locust scenarios (``locust -f loadtests/``) and a runner that starts a server
(``python -m loadtests``)."""
