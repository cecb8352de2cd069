"""Ferrylink transaction-manager service."""
