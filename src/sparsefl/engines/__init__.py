"""Engines execute client tasks: embedded (in-process or worker processes); Flower in engines/flower."""
