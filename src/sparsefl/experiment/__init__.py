"""Run folders, checkpoints, the experiment runner and the benchmark driver."""
