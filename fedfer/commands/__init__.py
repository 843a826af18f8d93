"""fedfer/commands: one module per `fedfer` sub-command family."""


class UsageError(ValueError):
    """Bad input a user gave a command (a path, a flag's value); fedfer/cli.py prints it as one line,
    exit 2. A plain ValueError reaching the CLI counts as a fedfer bug ("internal error"), so commands
    raise this for what the user can fix."""
