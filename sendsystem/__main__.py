"""`python -m sendsystem` is the `sendsystem` command."""

from .cli import main

main()
