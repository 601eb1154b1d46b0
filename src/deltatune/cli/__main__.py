"""`python -m deltatune.cli ...` runs the `deltatune` command."""
from .main import main

main()
