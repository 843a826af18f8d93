"""What the ServerApp and the ClientApp share (Flower's `task.py`, grown up): the config and its defaults,
the wire format, the models, the dataset readers, plain training and evaluation. Imports no other fedfer
package (tests/test_architecture.py); docs/architecture.md has the map."""
