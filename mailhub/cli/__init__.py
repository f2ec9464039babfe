"""The command line: the edge where errors become messages without tracebacks."""
