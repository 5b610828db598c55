"""Reading the compiler's answers (kdiff_jax/aot.py) on its error text (its collectives: test_collectives.py)."""
from kdiff_jax import aot


def test_out_of_memory_message_is_read():
  message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
             "temporaries (43.92G) exceeds available HBM (30.75G).")
  assert aot._NEEDED.search(message).groups() == ("HLO temporaries", "43.92G", "30.75G")
