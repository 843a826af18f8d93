"""fedfer/commands."""
