"""A driver in a process of its own, for the driver ``kill -9`` test.

Usage: ``python ray_driver.py CLUSTER_ADDRESS STORE N`` runs N slow examples on the cluster into
STORE with two actors, as a user's script would.
"""

from __future__ import annotations

import os
import sys

import ray

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import procval
from helpers import ray_programs, toys
from procval.backends.ray import RayBackend

if __name__ == "__main__":
    address, store, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p)
    ray.init(address=address, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    procval.evaluate(
        ray_programs.slow_double,
        toys.dataset(n),
        toys.metric,
        backend=RayBackend(num_cpus=0.5),
        workers=2,
        store=store,
        progress=False,
    )
