"""Small helpers for tests: polling with a deadline instead of sleeping."""

from ferrylink_ops.polling import wait_until

__all__ = ["wait_until"]
