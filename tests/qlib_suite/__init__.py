"""Qlib's own data-layer tests, run twice on generated data: with local Qlib and through an embedded
Qlib-Server (``qlib_server.client``), every answer of Qlib's data providers compared (``python -m
tests.qlib_suite QLIB_TESTS_DIR``, or ``nox -s qlib_tests -- QLIB_TESTS_DIR``)."""
