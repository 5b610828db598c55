"""configs/meanflow_in256.py with the authors' step: the guidance forwards and the JVP on every
row (objective.meanflow.full_batch_jvp), for comparing the cost of a step (benchmarks/RESULTS.md);
the loss and gradients are the same (tests/test_meanflow.py)."""
from configs import meanflow_in256


def get_config():
  config = meanflow_in256.get_config()
  config.objective.meanflow.full_batch_jvp = True
  return config
