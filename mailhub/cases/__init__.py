"""cases: see the package docstring for where this sits on a message's path."""
