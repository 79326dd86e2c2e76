"""Research drivers and probes: `python -m experiments.NAME` from the repository root.

Not part of the installed product: they import the library (vdiff, train) and record what they measured in
experiments/README.md; nothing in vdiff, train or serve imports them."""
