"""Any sparsefl experiment on Flower, unchanged: the ServerApp runs our server loop with a
:class:`~sparsefl.engines.flower.engine.FlowerEngine`, the ClientApp runs our client runtime.

Modules
-------
options      the run-config keys of a sparsefl Flower app (no Flower import)
node_states  client states as files on a node, found again by a resumed run
server_app   ``app``: the ServerApp
client_app   ``app``: the ClientApp
export       write a Flower app folder for ``flwr run`` (no Flower import)
launch       ``run_on_flower``: engines flower-sim / flower-local on this machine (no Flower import)

Importing this package does not import Flower; :func:`run_on_flower` starts Flower's
executables as child processes.
"""

from sparsefl.apps.flower.launch import FlowerRunError, LocalFederation, run_on_flower

__all__ = ["FlowerRunError", "LocalFederation", "run_on_flower"]
