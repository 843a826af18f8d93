"""shared_models/models."""
