"""The YAML configs shipped as package data: `default.yaml`, the embedded default that
`search.config.load` reads when no `--config` is given, and ready-to-run `examples/`."""
