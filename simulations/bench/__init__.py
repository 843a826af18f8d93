"""simulations/bench."""
