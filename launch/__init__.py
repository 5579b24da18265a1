"""Command line: run recipes locally or on SLURM, write data, compare runs."""
