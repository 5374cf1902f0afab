"""Sessions: ``lint``, ``unit``, ``integration`` (the README's test command runs both), ``fuzz``, ``load``,
``bench``, ``demo``, ``qlib_tests``."""

import os

import nox

nox.options.sessions = ["lint", "unit", "integration"]
nox.options.reuse_existing_virtualenvs = True
PYTHON = os.environ.get("NOX_PYTHON", "3.11")
#: the linters, pinned: a new release's new rules land in a commit of their own
LINTERS = ("ruff==0.17.6", "mypy==2.4.1")


def install(session, *extras):
    session.install("-e", f".[{','.join(('test',) + extras)}]")


@nox.session(python=PYTHON)
def lint(session):
    """ruff (lint and import order) on the code and tests, mypy on the package (config in pyproject.toml)."""
    install(session)  # mypy reads the installed libraries' own types (pydantic, redis, requests, ...)
    session.install(*LINTERS)
    session.run("ruff", "check", "qlib_server", "tests", "sim", "loadtests", "noxfile.py")
    session.run("mypy", "qlib_server")


@nox.session(python=PYTHON)
def unit(session):
    """Unit tests: no services needed (the Locust scenarios run against an embedded server)."""
    install(session, "load")
    session.run("pytest", "tests/unit", "-q", "-p", "no:cacheprovider", *session.posargs)


@nox.session(python=PYTHON)
def integration(session):
    """Integration tests against RabbitMQ and Redis (testcontainers, or QLIB_TEST_*_URL)."""
    install(session, "sim")
    session.run("pytest", "tests/integration", "-q", "-p", "no:cacheprovider", *session.posargs)


@nox.session(python=PYTHON)
def qlib_tests(session):
    """Qlib's own data-layer tests on generated data, locally and through an embedded server, every answer
    compared (``tests/qlib_suite``). Qlib's tests are not in this repository nor in the pyqlib wheel: give
    the ``tests/`` directory of Qlib's source at the pinned version, ``nox -s qlib_tests -- DIR`` or
    ``QLIB_TESTS=DIR``; without it the session says how to get it and fails."""
    args = list(session.posargs)
    if not args or args[0].startswith("-"):
        if not os.environ.get("QLIB_TESTS"):
            session.error("give Qlib's tests/ directory (v0.9.7): nox -s qlib_tests -- DIR, or QLIB_TESTS=DIR; "
                          "e.g. git clone --depth 1 --branch v0.9.7 https://github.com/microsoft/qlib /tmp/qlib "
                          "and DIR=/tmp/qlib/tests (see tests/qlib_suite/__main__.py)")
        args.insert(0, os.environ["QLIB_TESTS"])
    install(session)
    session.run("python", "-m", "tests.qlib_suite", *args)


@nox.session(python=PYTHON)
def fuzz(session):
    """A long hypothesis run over the request path (not part of the default run)."""
    install(session)
    session.run("pytest", "tests/unit", "-q", "-k", "fuzz or hypothesis", "--hypothesis-profile=long", *session.posargs)


@nox.session(python=PYTHON)
def load(session):
    """Start a server and run a short headless Locust run against it."""
    install(session, "load", "sim")
    session.run("python", "-m", "loadtests", *session.posargs)


@nox.session(python=PYTHON)
def bench(session):
    """Benchmarks: print a table and write bench-results/bench.json."""
    install(session, "load", "sim")
    session.run("python", "-m", "sim.bench_engine")
    session.run("python", "-m", "sim.bench_update")
    session.run("python", "-m", "sim.bench", *session.posargs)


@nox.session(python=PYTHON)
def demo(session):
    """The demo: generated data, an embedded server, real pyqlib clients and the simulator."""
    install(session, "sim")
    session.run("python", "-m", "sim.demo", *session.posargs)
