"""Documentation tooling: scripts that regenerate the pictures under docs/ (`python -m tools.NAME` from the
repository root). Not part of the installed product."""
