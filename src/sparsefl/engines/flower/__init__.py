"""The Flower adapter (extra ``sparsefl[flower]``): any sparsefl experiment on Flower, unchanged.

The only place sparsefl imports ``flwr``. Nothing Flower-specific enters the algorithm: the
ServerApp runs our server loop (:class:`sparsefl.fl.server.Server` through
:func:`sparsefl.experiment.runner.run_experiment`) with a :class:`.engine.FlowerEngine`, and
the ClientApp runs our client runtime (:func:`sparsefl.fl.client.run_client`). Payloads are
our codecs' bytes inside ArrayRecords tagged ``sparsefl/<codec>`` (:mod:`.records`); per-client
state lives in each node's ``context.state``.

Modules
-------
options      the run-config keys of a sparsefl Flower app; client -> node map (no Flower import)
records      ClientTask / ClientResult / client state <-> Flower records
engine       FlowerEngine (the server loop's Engine on a Flower Grid)
server_app   ``app``: the ServerApp
client_app   ``app``: the ClientApp
export       write a Flower app folder for ``flwr run`` (no Flower import)
launch       ``run_on_flower``: engines flower-sim / flower-local on this machine (no Flower import)

Importing this package does not import Flower; :func:`run_on_flower` starts Flower's
executables as child processes.
"""

from sparsefl.engines.flower.launch import FlowerRunError, LocalFederation, run_on_flower

__all__ = ["FlowerRunError", "LocalFederation", "run_on_flower"]
