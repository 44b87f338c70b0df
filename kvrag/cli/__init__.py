"""The ``kvrag`` command line (Typer)."""
