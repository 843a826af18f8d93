"""client/runtime."""
