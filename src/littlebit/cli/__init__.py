"""The ``littlebit`` command (``littlebit.cli.main.main``), one module per subcommand."""
