"""server/deploy."""
