"""One module per ``atempstore`` subcommand; see ``atempstore.cli``."""

__all__ = ()
