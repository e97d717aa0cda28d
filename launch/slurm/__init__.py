"""Slurm: job arrays for sweeps (array.py) and a local single-node cluster (local_cluster.sh)."""
