"""The Ferrylink services, one sub-package per process."""
