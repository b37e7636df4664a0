"""`python -m hwnas [override ...]`: the `hwnas` command."""

from hwnas.search.cli import run

run()
