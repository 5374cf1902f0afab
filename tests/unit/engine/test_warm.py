"""A worker loads every kernel when it starts, not on a request (the resumable ones of the daily update too)."""

import numba

from qlib_server import engine
from qlib_server.engine import kernels  # noqa: F401
from qlib_server.engine.kernels import ewm, moments, pairs, qlib_windows, regression, resumable, windows


def test_warming_up_compiles_every_kernel_the_evaluator_calls(qlib_data):
    engine.warm()
    modules = (windows, moments, ewm, pairs, qlib_windows, regression, resumable)
    entry = ("rolling_", "expanding_", "ewm_", "resume_")
    dispatchers = {f"{m.__name__}.{name}": f for m in modules for name, f in vars(m).items()
                   if isinstance(f, numba.core.registry.CPUDispatcher) and name.startswith(entry)}
    assert dispatchers
    cold = [name for name, f in dispatchers.items() if not f.signatures]
    assert not cold, f"not compiled by warm(): {cold}"


def test_warming_up_compiles_the_row_kernels_for_every_kind_of_values_a_field_holds(qlib_data):
    from qlib_server.engine.kernels import rows

    engine.warm()
    assert {str(signature[0].dtype) for signature in rows.cut.signatures} >= {"float32", "float64", "bool"}
    assert rows.compress.signatures
