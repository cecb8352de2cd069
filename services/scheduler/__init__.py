"""Ferrylink scheduler service."""
