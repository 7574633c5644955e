"""Run directory -> one table -> pick -> export, plots, report.

results (read the run) -> select (the pick, the Pareto front) -> export (adapter_config.json),
plots (PNGs) -> report (report.md and the `python -m analysis.report` command); config holds
the selection settings, files the atomic writes. Reads only the run directory: never imports
`trainables` or `search`.
"""
