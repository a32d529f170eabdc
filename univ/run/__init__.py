"""The correlate run, one job per module; ``univ.correlate`` is its public face (see its docstring)."""
