"""Everything that only exists to simulate or measure: the synthetic classroom, the one-machine launcher,
public pre-training, the reference models (b), (c), (d), tuning harnesses and `bench/`. Only fedfer/commands
(and tests) import it (tests/test_architecture.py)."""
