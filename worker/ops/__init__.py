"""What operators run: the command line, `check`, the dead-letter queue tools, `demo`, `publish`."""
