"""Command line: ``qlib-server serve -c config.yaml [-m ...]`` and ``qlib-server gen-data DIR``."""

from __future__ import annotations

import argparse
import sys

MODULES = ("request_handler", "data_processor")


def _serve(args: argparse.Namespace) -> int:
    from .config import load_config
    from .errors import ConfigError

    overrides = {}
    if args.port is not None:
        overrides["flask_port"] = args.port
    try:
        cfg = load_config(args.config, **overrides)
    except ConfigError as exc:
        print(f"qlib-server: {exc}", file=sys.stderr)
        return 2

    processor = None
    if "data_processor" in args.module and not args.embedded:
        import multiprocessing as mp

        from .worker.processor import run_processor

        if "request_handler" not in args.module:
            run_processor(cfg.model_dump())
            return 0
        # Start the processor before the handler patches this process for gevent.
        processor = mp.get_context("spawn").Process(target=run_processor, args=(cfg.model_dump(),),
                                                    name="qlib-server-processor")
        processor.start()

    if cfg.async_mode == "gevent":
        from gevent import monkey

        monkey.patch_all()
    import signal

    from .log import setup_logging

    setup_logging(cfg)
    if args.embedded:
        from .embedded import EmbeddedServer

        server = EmbeddedServer(cfg)
        handler, serve = server.handler, server.serve
    else:
        from .front.handler import RequestHandler
        from .state.registry import SessionRegistry
        from .worker.processor import rabbitmq_factory

        handler = RequestHandler(cfg, SessionRegistry.from_config(cfg), lambda: rabbitmq_factory(cfg))
        serve = handler.serve
    handler.shutdown_on(signal.SIGTERM)
    try:
        serve()
    except KeyboardInterrupt:
        pass
    finally:
        if processor is not None:
            processor.terminate()
            processor.join(60)
    return 0


def _refresh(args: argparse.Namespace) -> int:
    from .config import load_config
    from .errors import ConfigError
    from .worker.updater import refresh_main

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"qlib-server: {exc}", file=sys.stderr)
        return 2
    refresh_main(cfg.model_dump(), show_progress=True)
    return 0


def _gen_data(args: argparse.Namespace) -> int:
    from .datagen import generate_dataset, generate_minute_dataset

    generate = generate_minute_dataset if args.freq == "1min" else generate_dataset
    root = generate(args.dir, instruments=args.instruments, days=args.days, start=args.start, seed=args.seed)
    bars = " of 240 1-minute bars" if args.freq == "1min" else ""
    print(f"wrote a Qlib dataset of {args.instruments} instruments x {args.days} days{bars} to {root}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qlib-server", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("-c", "--config", default="config.yaml", help="config file (YAML)")
    serve.add_argument("-m", "--module", nargs="+", choices=MODULES, default=list(MODULES), help="modules to run")
    serve.add_argument("--port", type=int, help="override flask_port")
    serve.add_argument("--embedded", action="store_true",
                       help="one process with in-memory broker and registry: no RabbitMQ, no Redis")
    serve.set_defaults(func=_serve)

    refresh = sub.add_parser("refresh", help="update caches to the data on disk and invalidate cached answers")
    refresh.add_argument("-c", "--config", default="config.yaml", help="config file (YAML)")
    refresh.set_defaults(func=_refresh)

    gen = sub.add_parser("gen-data", help="write a synthetic Qlib dataset")
    gen.add_argument("dir")
    gen.add_argument("--instruments", type=int, default=20)
    gen.add_argument("--days", type=int, default=750)
    gen.add_argument("--start", default="2018-01-02")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--freq", choices=("day", "1min"), default="day",
                     help="daily bars, or 1-minute bars (calendars/1min.txt, *.1min.bin)")
    gen.set_defaults(func=_gen_data)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
