"""Ferrylink sentinel-link service."""
