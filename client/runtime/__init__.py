"""A deployed school's node processes: the SuperNode launcher (`supernode`), the warm ClientApp executor
(`warm_executor`) with its check of the coordinator's app (`app_check`), and the start check (`preflight`)."""
