"""One module per `longcat-tuner` subcommand; each exposes `register(subparsers)`."""
