"""The ClientApp (`client.app:app`): one school's round (`school_round`), who the node is (`node`), the
SuperNode runtime (`runtime/`) and the classroom pipeline (`classroom/`). Never imports `server`."""
