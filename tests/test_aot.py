"""Reading the compiler's answers (kdiff_jax/aot.py) on hand-written HLO and error text."""
from kdiff_jax import aot

HLO = """
  %ag = (bf16[1,32,24]{1,2,0}, bf16[4,32,24]{1,2,0}) all-gather-start(bf16[1,32,24]{1,2,0} %p), dimensions={0}
  %ag.d = bf16[4,32,24]{1,2,0} all-gather-done(%ag)
  %ar = (f32[64,192]{1,0}, f32[128]{0}) all-reduce(f32[64,192]{1,0} %a, f32[128]{0} %b), to_apply=%sum
  %ar.2 = f32[8]{0} all-reduce(f32[8]{0} %c), to_apply=%sum
"""


def test_collectives_count_results_once():
  found = aot.collectives(HLO)
  assert set(found) == {"all-gather", "all-reduce"}
  count, nbytes, shapes = found["all-gather"]            # -start counted, -done not; the
  assert (count, nbytes, shapes) == (1, 4 * 32 * 24 * 2, [(4, 32, 24)])   # operand not a result
  count, nbytes, shapes = found["all-reduce"]
  assert (count, nbytes) == (2, (64 * 192 + 128 + 8) * 4)
  assert shapes == [(64, 192), (128,), (8,)]


def test_out_of_memory_message_is_read():
  message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
             "temporaries (43.92G) exceeds available HBM (30.75G).")
  assert aot._NEEDED.search(message).groups() == ("HLO temporaries", "43.92G", "30.75G")
