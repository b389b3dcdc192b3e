"""The command line: thin Typer commands that parse flags, call the library, and render with Rich."""
