"""The ``sparsefl`` command line."""
