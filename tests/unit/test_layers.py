"""The layers of ``qlib_server``: imports only run down.

    cli, embedded, __main__       entry points: assemble front and workers, may import anything
    front/        worker/         the Socket.IO front; the processes computing with Qlib (never each other)
                  engine/         Qlib's expressions over blocks of instruments (numpy, numba, Qlib only)
    state/        broker/         what the processes share: Redis and the dataset cache records; transports
    top-level modules             protocol, expressions, dataset_keys, config, errors, metrics, admission, log,
                                  inst_processors, safe_pickle, datagen(_updates)
    client/                       Qlib providers for clients: nothing of the server at all

Every module's imports (top-level and inside functions, absolute and relative) are read with ``ast``, so a
forbidden import fails here even when it is only reached at run time. A new module or folder of the
package must be given its layer in ``LAYERS`` below.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "qlib_server"

#: the layer of each module: by sub-package, or by name for the top-level modules
LAYERS = {
    "qlib_server": "root",  # the package's __init__: run by every import of qlib_server.client
    "qlib_server.__main__": "entry",
    "qlib_server.cli": "entry",
    "qlib_server.embedded": "entry",
    "qlib_server.admission": "top",
    "qlib_server.config": "top",
    "qlib_server.datagen": "top",
    "qlib_server.dataset_keys": "top",
    "qlib_server.datagen_updates": "top",
    "qlib_server.errors": "top",
    "qlib_server.expressions": "top",
    "qlib_server.inst_processors": "top",
    "qlib_server.log": "top",
    "qlib_server.metrics": "top",
    "qlib_server.protocol": "top",
    "qlib_server.safe_pickle": "top",
    "qlib_server.broker": "broker",
    "qlib_server.state": "state",
    "qlib_server.front": "front",
    "qlib_server.worker": "worker",
    "qlib_server.engine": "engine",
    "qlib_server.client": "client",
}

#: the layers each layer may import (its own included)
ALLOWED = {
    "root": set(),
    "client": {"client"},
    "top": {"top"},
    "broker": {"top", "broker"},
    "state": {"top", "state"},
    "front": {"top", "broker", "state", "front"},
    "engine": {"top", "engine"},
    "worker": {"top", "broker", "state", "engine", "worker"},
    "entry": {"top", "broker", "state", "front", "worker", "engine", "client", "entry", "root"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def layer_of(module: str) -> str | None:
    """The layer of ``module``: the entry of its longest prefix in ``LAYERS``."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        layer = LAYERS.get(".".join(parts[:n]))
        if layer is not None and (n == len(parts) or ".".join(parts[:n]) != "qlib_server"):
            return layer
    return None


def exists(module: str) -> bool:
    relative = Path(*module.split(".")[1:])
    return (PACKAGE / relative).with_suffix(".py").is_file() or (PACKAGE / relative / "__init__.py").is_file()


def imports(path: Path) -> list[tuple[int, str, str]]:
    """``(line, the import as written, module imported)`` for each module of ``qlib_server`` that ``path``
    imports; ``from package import name`` counts as importing ``package.name`` when that is a module."""
    this = module_name(path)
    package = this if is_package(path) else this.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "qlib_server":
                    found.append((node.lineno, f"import {alias.name}", alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "qlib_server":
                continue
            written = f"from {'.' * node.level}{node.module or ''} import {', '.join(a.name for a in node.names)}"
            for alias in node.names:
                target = f"{source}.{alias.name}"
                found.append((node.lineno, written, target if exists(target) else source))
    return found


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def violations(paths) -> list[str]:
    out = []
    for path in paths:
        this = module_name(path)
        layer = layer_of(this)
        for line, written, target in imports(path):
            other = layer_of(target)
            if other is None or other not in ALLOWED[layer]:
                allowed = ", ".join(sorted(ALLOWED[layer])) or "nothing of qlib_server"
                out.append(f"{path.relative_to(PACKAGE.parent)}:{line}: `{written}` imports {target} "
                           f"(layer {other}) into {this} (layer {layer}, which may import: {allowed})")
    return out


def test_every_module_has_a_layer():
    missing = [module_name(p) for p in modules() if layer_of(module_name(p)) is None]
    assert not missing, f"give these modules a layer in LAYERS of {Path(__file__).name}: {missing}"


def test_imports_run_down_the_layers():
    found = violations(modules())
    assert not found, "imports against the layers (see this test's docstring):\n" + "\n".join(found)


@pytest.mark.parametrize("source, bad", [
    ("qlib_server/state/fleet.py", "from ..front.handler import RequestHandler\n"),
    ("qlib_server/worker/processor.py", "def f():\n    from qlib_server.front import transfer\n"),
    ("qlib_server/front/transfer.py", "from ..worker import datacache\n"),
    ("qlib_server/client/providers.py", "import qlib_server.protocol\n"),
    ("qlib_server/protocol.py", "from .state import keys\n"),
])
def test_a_forbidden_import_is_named(tmp_path, monkeypatch, source, bad):
    """The check itself: a module given one forbidden import fails, naming the file, line and import."""
    copy = tmp_path / "qlib_server"
    for path in modules():
        target = copy / path.relative_to(PACKAGE)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    edited = copy / Path(source).relative_to("qlib_server")
    edited.write_text(edited.read_text() + "\n" + bad)
    monkeypatch.setitem(globals(), "PACKAGE", copy)
    found = violations(sorted(copy.rglob("*.py")))
    assert len(found) == 1 and found[0].startswith(source + ":"), found
