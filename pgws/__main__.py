"""Allow ``python -m pgws``."""

from pgws.cli import main

main()
