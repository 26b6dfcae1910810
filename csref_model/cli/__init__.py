"""Command-line tools, one module per command, each with `main(argv) -> int`; run them as
`python -m csref_model ground|export|benchmark|retrieve ...` (csref_model/__main__.py)."""

# Exit status of a command refused for bad input (missing file, bad flag, mismatched checkpoint).
USER_ERROR = 2
