"""What a data-processor worker computes with Qlib for each request type.

Qlib runs in server mode: the dataset cache is written under ``<provider_uri>/<dataset_cache_dir_name>``
where clients read it through their shared mount; it is served only while it is current, and its
locks die with their holder (see :mod:`qlib_server.worker.datacache`). The expression cache is off by
default: it makes a cold dataset three times slower and pyqlib's default client never reads it; set
``expression_cache: DiskExpressionCache`` for clients that do (``disk_cache=0`` then prepares it).
"""

from __future__ import annotations

import contextlib
import gc
import logging
from pathlib import Path

from ..config import ServerConfig
from ..errors import ComputeError, RequestError

log = logging.getLogger(__name__)


def init_qlib(cfg: ServerConfig, warm: bool = False) -> None:
    """Initialise Qlib in server mode for this process (its cache locks in the Redis of ``cfg``); with
    ``warm``, load the engine's kernels too (a feature worker), so that no request waits for them."""
    import qlib

    from . import datacache, storage

    datacache.install_locks()
    qlib.init(
        default_conf="server",
        provider_uri=str(Path(cfg.provider_uri).expanduser()),
        expression_cache=cfg.expression_cache,
        dataset_cache={"class": datacache.ServerDatasetCache.__name__, "module_path": datacache.__name__},
        dataset_cache_dir_name=cfg.dataset_cache_dir_name,
        features_cache_dir_name=cfg.features_cache_dir_name,
        redis_host=cfg.redis_host,
        redis_port=cfg.redis_port,
        redis_task_db=cfg.redis_task_db,
        redis_password=cfg.redis_password,
        kernels=cfg.kernels,
        feature_provider={"class": "LocalFeatureProvider", "kwargs": {"backend": storage.BACKEND}},
        logging_level=cfg.logging_level,
    )
    from qlib.config import C

    C["region"] = cfg.region  # passed to init, Qlib's server config would warn "Unrecognized config region"
    C.set_region(cfg.region)
    from ..engine import features  # noqa: F401  (numba and the kernels' modules: 0.14 s of a light worker's first task)

    if warm:
        from .. import engine

        engine.warm()
        from qlib.data.data import DatasetD

        with contextlib.suppress(Exception):  # the Redis of the cache locks connected now, not by the first request
            DatasetD._provider.r.ping()  # (a Redis that is down fails that request, as it would have)
    # What the process holds now (Qlib, pandas, numba and their modules: some 300,000 objects) lives as long as it
    # does: out of the collector's reach, a full collection scans only what requests left (it took 0.13 s of a
    # 0.33 s extension, measured, with all of it scanned).
    gc.collect()
    gc.freeze()


def forget_data() -> None:
    """Drop Qlib's in-memory calendars, instrument lists and URIs (after the data changed)."""
    from qlib.data.cache import H

    from . import storage

    H.clear()
    storage.forget()


def calendar(args: dict) -> list:
    from qlib.data import D

    return [str(t) for t in D.calendar(args["start_time"], args["end_time"], args["freq"], args["future"])]


def _check_market(instruments, freq: str) -> None:
    """Refuse a market that has no instrument file, naming the market and nothing of the disk."""
    from qlib.config import C

    if isinstance(instruments, dict) and "market" in instruments:  # not a dict of codes and spans
        market = instruments["market"]
        if not (Path(C.dpm.get_data_uri(freq)) / "instruments" / f"{market}.txt").is_file():
            raise RequestError(f"unknown market {market!r}")


def instrument(args: dict):
    from qlib.data import D

    _check_market(args["instruments"], args["freq"])
    result = D.list_instruments(args["instruments"], args["start_time"], args["end_time"], args["freq"],
                                args["as_list"])
    if isinstance(result, dict):
        return {code: [[str(s), str(e)] for s, e in spans] for code, spans in result.items()}
    return list(result)


def feature(args: dict, expression_cache: bool) -> str:
    from qlib.data.data import DatasetD

    _check_market(args["instruments"], args["freq"])
    if args["disk_cache"] == 0 and not expression_cache:
        return ""  # nothing to prepare: the client computes from its own mount
    from . import datacache

    # An empty result is a cache of no rows (see datacache.write_empty): the client reads an empty frame.
    # A client that streams the cache (``stream``) needs no HDF5 file: only the records are written for it.
    # ``inst_processors`` (checked, in their wire form) key a cache of the request's window; Qlib computes it.
    with datacache.records_only() if args.get("stream") else contextlib.nullcontext():
        return DatasetD._dataset_uri(args["instruments"], args["fields"], args["start_time"], args["end_time"],
                                     args["freq"], args["disk_cache"], inst_processors=args.get("inst_processors", []))


def run(task_type: str, args: dict, expression_cache: bool = False):
    """Compute one task; raise :class:`ComputeError` with a readable message when Qlib fails."""
    try:
        if task_type == "calendar":
            return calendar(args)
        if task_type == "instrument":
            return instrument(args)
        if task_type == "feature":
            return feature(args, expression_cache)
    except (RequestError, ComputeError):  # their messages are written for the client
        raise
    except FileNotFoundError as exc:
        raise ComputeError(f"no such data: {Path(str(exc.filename or exc)).name}") from None
    except Exception as exc:
        from qlib.config import C

        log.warning("%s task failed: %r", task_type, exc, exc_info=log.isEnabledFor(logging.DEBUG))
        message = f"{type(exc).__name__}: {exc}".replace(str(C.dpm.get_data_uri(args.get("freq", "day"))), "<data>")
        raise ComputeError(message[:500]) from None
    raise ComputeError(f"unknown task type {task_type!r}")
