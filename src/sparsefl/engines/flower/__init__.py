"""The Flower transport (extra ``sparsefl[flower]``): :class:`.engine.FlowerEngine` carries the
server loop's client tasks to Flower nodes, and :mod:`.records` turns tasks, results and
client states into Flower records and back. The Flower apps that use them live in
:mod:`sparsefl.apps.flower`; these two packages are the only ones that import ``flwr``."""
