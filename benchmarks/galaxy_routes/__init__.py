"""Galaxy dynamic job rules for benchmarks/galaxy.py (Galaxy loads the functions of a rules package's modules)."""
