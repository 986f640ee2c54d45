"""The ``flexgr`` command line (installed as ``flexgr.cli``)."""
