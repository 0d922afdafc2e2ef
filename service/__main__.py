"""``python -m service --model DIR_OR_ID --engine {auto,transformers,vllm} --host --port``.

Every :class:`service.settings.Settings` field is a flag (``--max-batch-size``) and a ``PALIGEMMA_*``
variable; flags win. One uvicorn worker: each worker would load its own model. The ``__main__`` guard
matters because vLLM starts its engine core with ``spawn``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import typing

from pydantic import ValidationError

from service.settings import Settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service", description="Serve PaliGemma over HTTP.")
    for name, field in Settings.model_fields.items():
        flag = f"--{name.replace('_', '-')}"
        if typing.get_origin(field.annotation) is list:  # repeatable: --lora a=/x --lora b=/y
            parser.add_argument(flag, dest=name, action="append", default=None, help=field.description)
        else:
            parser.add_argument(flag, dest=name, default=None, help=field.description)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        for error in exc.errors():
            sys.stderr.write(f"error: {'.'.join(str(p) for p in error['loc']) or 'settings'}: {error['msg']}\n")
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import uvicorn

    from service.app import create_app
    from service.guards.drain import SHUTDOWN_GRACE_S, DrainingServer

    app = create_app(settings)
    server = DrainingServer(  # SIGTERM: drain admitted requests, then exit 0 (service/guards/drain.py)
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            workers=1,
            log_level=settings.log_level,
            proxy_headers=False,
            timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
        ),
        admission=app.state.service.admission,
        drain_timeout_s=settings.drain_timeout_s,
    )
    app.state.service.request_exit = lambda: setattr(server, "should_exit", True)
    server.run()
    return int(app.state.service.exit_code)


if __name__ == "__main__":
    sys.exit(main())
