"""Ferrylink: clustered managed file transfer."""
