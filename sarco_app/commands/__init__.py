"""Sub-commands of ``python -m sarco_app``; one module per command (see ``sarco_app.__main__``)."""
