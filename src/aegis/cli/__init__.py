"""The ``aegis`` command line: one module per verb group, mounted by :mod:`aegis.cli.main`."""
