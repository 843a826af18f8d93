"""The ServerApp (`server.app:app`): run start and resume, the strategy, reply validation, the round
writer, transport, the report, and the deployment tooling (`deploy/`). Never imports `client`."""
