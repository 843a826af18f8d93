"""fedfer: the command-line entry point. The system itself lives in server/, client/, shared_models/,
simulations/ and privacy/; server/ and client/ never import each other and share shared_models/."""
