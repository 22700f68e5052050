"""``python -m rankcut`` runs the command line."""

from rankcut.cli import main

main()
