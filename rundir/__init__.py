"""The run directory, the layer every other package stands on.

`search` (the driver), `trainables` (inside a trial) and `analysis` all read and write the
same directory (or storage URI); this package owns how: its file names (`layout`), the one
atomic write and the path-or-URI helpers (`files`), where a run lives and how its copy at a
URI is kept in step (`location`), the contract of a trial's parameters as Tune stores
them in `params.json` (`params`), that of its reports in `result.json` (`report`), and the record of
the run's settings and facts, `run_config.json` (`runconfig`). It imports none of the packages above it, and neither
torch nor Ray, so a worker or the CLI can use it at no cost.
"""
