"""The `deltatune` command line (train, eval, inspect, merge, compress, extract): `main.py`."""
