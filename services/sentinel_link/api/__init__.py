"""HTTP API of the sentinel link: one router per resource."""
