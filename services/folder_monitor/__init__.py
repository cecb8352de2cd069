"""Ferrylink folder-monitor service."""
