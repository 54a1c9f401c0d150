"""One module per process role, all over :class:`sendsystem.runner.Runner`."""
