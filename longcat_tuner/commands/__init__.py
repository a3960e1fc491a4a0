"""One module per `longcat-tuner` subcommand; each exposes `register(subparsers)`."""


def quiet_library_progress() -> None:
    """`--no-progress` also for the libraries' own bars (transformers' `Loading weights`, the hub's), which
    otherwise still wrote carriage-return bars into a log that asked for none."""
    import os
    import sys

    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when transformers / huggingface_hub are imported
    if "transformers" in sys.modules:  # already imported (the Python API, tests): switch it off there too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
