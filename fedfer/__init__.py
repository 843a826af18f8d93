"""fedfer: the command-line entry point. The system itself lives in server/, client/, shared_models/,
simulations/ and privacy/; of these only fedfer/commands imports simulations/."""
