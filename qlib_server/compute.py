"""What a data-processor worker computes with Qlib for each request type.

Qlib runs in server mode: the dataset cache is written under ``<provider_uri>/<dataset_cache_dir_name>``
where clients read it through their shared mount. The expression cache is off by default: it makes
a cold dataset three times slower and pyqlib's default client never reads it; set
``expression_cache: DiskExpressionCache`` for clients that do (``disk_cache=0`` then prepares it).
"""

from __future__ import annotations

import logging
from pathlib import Path

from .config import ServerConfig
from .errors import ComputeError, RequestError

log = logging.getLogger(__name__)


def init_qlib(cfg: ServerConfig, redis_factory=None) -> None:
    """Initialise Qlib in server mode for this process (``redis_factory``: Qlib's cache locks' Redis)."""
    import qlib

    if redis_factory is not None:
        import qlib.data.cache
        import qlib.utils

        qlib.utils.get_redis_connection = qlib.data.cache.get_redis_connection = redis_factory

    qlib.init(
        default_conf="server",
        provider_uri=str(Path(cfg.provider_uri).expanduser()),
        region=cfg.region,
        expression_cache=cfg.expression_cache,
        dataset_cache="DiskDatasetCache",
        dataset_cache_dir_name=cfg.dataset_cache_dir_name,
        features_cache_dir_name=cfg.features_cache_dir_name,
        redis_host=cfg.redis_host,
        redis_port=cfg.redis_port,
        redis_task_db=cfg.redis_task_db,
        redis_password=cfg.redis_password,
        kernels=cfg.kernels,
        logging_level=cfg.logging_level,
    )


def forget_data() -> None:
    """Drop Qlib's in-memory calendars, instrument lists and URIs (after the data changed)."""
    from qlib.data.cache import H

    H.clear()


def refresh_caches(cfg: ServerConfig) -> dict:
    """Bring Qlib's disk caches up to the data: append new days to each dataset cache (or drop one
    that cannot be updated, it is rebuilt on demand) and drop the expression cache."""
    import shutil

    from qlib.data.data import DatasetD
    from qlib.data.cache import DiskDatasetCache

    forget_data()
    counts = {"updated": 0, "removed": 0}
    directory = cfg.dataset_cache_dir
    for meta in sorted(directory.glob("*.meta")) if directory.is_dir() else []:
        try:
            code = DatasetD.update(meta.stem, freq="day")
            counts["updated" if code != 2 else "removed"] += 1
        except Exception as exc:  # an unreadable cache is rebuilt on the next request
            log.warning("dropping dataset cache %s: %s", meta.stem, exc)
            DiskDatasetCache.clear_cache(directory / meta.stem)
            counts["removed"] += 1
    features = Path(cfg.provider_uri).expanduser() / cfg.features_cache_dir_name
    if features.is_dir():
        shutil.rmtree(features, ignore_errors=True)
    return counts


def calendar(args: dict) -> list:
    from qlib.data import D

    return [str(t) for t in D.calendar(args["start_time"], args["end_time"], args["freq"], args["future"])]


def _check_market(instruments, freq: str) -> None:
    """Refuse a market that has no instrument file, naming the market and nothing of the disk."""
    from qlib.config import C

    if isinstance(instruments, dict):
        market = instruments["market"]
        if not (Path(C.dpm.get_data_uri(freq)) / "instruments" / f"{market}.txt").is_file():
            raise RequestError(f"unknown market {market!r}")


def instrument(args: dict):
    from qlib.data import D

    _check_market(args["instruments"], args["freq"])
    result = D.list_instruments(args["instruments"], args["start_time"], args["end_time"], args["freq"], args["as_list"])
    if isinstance(result, dict):
        return {code: [[str(s), str(e)] for s, e in spans] for code, spans in result.items()}
    return list(result)


def feature(args: dict, expression_cache: bool) -> str:
    from qlib.data import D

    _check_market(args["instruments"], args["freq"])
    if args["disk_cache"] == 0 and not expression_cache:
        return ""  # nothing to prepare: the client computes from its own mount
    from qlib.config import C

    uri = D.features_uri(
        args["instruments"], args["fields"], args["start_time"], args["end_time"], args["freq"], args["disk_cache"]
    )
    if args["disk_cache"] == 1 and not (Path(C.dpm.get_data_uri(args["freq"])) / C.dataset_cache_dir_name / uri).exists():
        # Qlib writes no cache file for an empty result; a client would fail to open the URI.
        raise RequestError("no data for these instruments and fields")
    return uri


def run(task_type: str, args: dict, expression_cache: bool = False):
    """Compute one task; raise :class:`ComputeError` with a readable message when Qlib fails."""
    try:
        if task_type == "calendar":
            return calendar(args)
        if task_type == "instrument":
            return instrument(args)
        if task_type == "feature":
            return feature(args, expression_cache)
    except RequestError:
        raise
    except FileNotFoundError as exc:
        raise ComputeError(f"no such data: {Path(str(exc.filename or exc)).name}") from None
    except Exception as exc:
        from qlib.config import C

        log.warning("%s task failed: %r", task_type, exc, exc_info=log.isEnabledFor(logging.DEBUG))
        message = f"{type(exc).__name__}: {exc}".replace(str(C.dpm.get_data_uri(args.get("freq", "day"))), "<data>")
        raise ComputeError(message[:500]) from None
    raise ComputeError(f"unknown task type {task_type!r}")
