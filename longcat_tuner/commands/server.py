"""`longcat-tuner server`: the web UI (config editor, dataset check, runs, gallery, I2V preview).

Binds 127.0.0.1 by default and prints the URL with its token. The server process never imports
torch: training, checking and sampling run as `longcat-tuner` subprocesses.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from longcat_tuner.commands.argtypes import bounded_int, positive_float


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "server",
        help="web UI: configure, launch and watch runs, preview image-to-video",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=bounded_int(0, 65535), default=8765, help="port to bind (default: 8765)")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path("longcat-tuner-ui"),
        help="folder for the UI's config files, run records, uploads and previews (default: ./longcat-tuner-ui)",
    )
    parser.add_argument(
        "--allow-dir",
        type=Path,
        action="append",
        default=None,
        help="folder the UI may read and write (models, datasets, output dirs); repeat for several. "
        "Default: the current folder. The data folder is always allowed.",
    )
    parser.add_argument(
        "--max-upload-mb", type=positive_float, default=20.0, help="largest start-frame upload accepted (default: 20 MB)"
    )
    parser.add_argument(
        "--max-jobs", type=bounded_int(1, 64), default=2,
        help="checks and previews that may run at once (each loads a model; default: 2); more answer 429",
    )
    parser.add_argument(
        "--allow-host",
        action="append",
        default=[],
        help="extra Host header name to accept (e.g. a machine name when binding a LAN address)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn  # imported here so `longcat-tuner --help` does not need the server extra

    from longcat_tuner.errors import ConfigError
    from longcat_tuner.fsutil import folder_problem
    from longcat_tuner.server.app import ServerSettings, create_app
    from longcat_tuner.server.security import TOKEN_ENV, new_token

    problem = folder_problem(args.data_dir, "--data-dir", "the command line")  # a file, a link loop, read-only
    if problem:
        raise ConfigError(problem)
    token = os.environ.get(TOKEN_ENV) or new_token()
    roots = tuple(args.allow_dir) if args.allow_dir else (Path.cwd(),)
    settings = ServerSettings(
        token=token,
        data_dir=args.data_dir.resolve(),
        allowed_roots=roots,
        host=args.host,
        extra_hosts=tuple(args.allow_host),
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_jobs=args.max_jobs,
    )
    app = create_app(settings)
    shown_host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    if ":" in shown_host:
        shown_host = f"[{shown_host}]"
    if args.host in ("0.0.0.0", "::"):
        print("warning: listening on every network interface; anyone who has the token can start runs")
    print(f"longcat-tuner web UI: http://{shown_host}:{args.port}/?token={token}", flush=True)
    print(f"data folder: {settings.data_dir}; allowed folders: {', '.join(map(str, settings.roots))}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
