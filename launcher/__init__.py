"""agent-sidecar's command line: `sidecar run -- CMD` and the management commands."""
