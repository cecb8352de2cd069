"""Ferrylink cluster-coordinator service."""
