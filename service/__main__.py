"""`python -m service` is the `promptserve` command: serve by default, or a client subcommand (service/cli.py)."""

from service.cli import main

raise SystemExit(main())
