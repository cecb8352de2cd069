"""Ferrylink's tooling: the `ferrylink` CLI, the local cluster runner and private broker
nodes for tests and benchmarks. Service processes never import this package."""
