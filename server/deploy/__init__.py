"""The work behind `fedfer deploy`: the deployment directory's layout, credentials (CA, certificates, node
and ledger keys), the commands, the one-machine start (`local`) and the SuperLink's start check (`preflight`)."""
