"""Run directory -> one table -> pick -> export, plots, report.

results (read the run) -> select (the comparison with the best, the pick, the Pareto front) ->
export (adapter_config.json), plots (PNGs), render (report.md's text); pipeline runs them in that
order over a run directory, report is its command line (`python -m analysis.report`);
candidates asks the same comparison what the search should train next; config holds the
selection settings. Reads only the run directory: never imports `trainables` or `search`.
"""
