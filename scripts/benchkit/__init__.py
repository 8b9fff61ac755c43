"""The parts of ``scripts/bench.py``, the end-to-end benchmark (see its docstring).

``config`` (the settings), ``workload`` (what each session says), ``sessions`` (the load
generator and the simulated player), ``baseline`` (the old audio service, its own
process), ``procs`` (processes and their CPU), ``sweep`` (rounds and the sweep) and
``report`` (lines, the plot, the table). Imported with ``scripts/`` on ``sys.path`` and
the repository before it (``bench.py`` arranges both).
"""
