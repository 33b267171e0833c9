"""CPU-sized hand network for tests and smoke runs: configs/tiny.py made a hand recipe.

  python -m coarsemetro_jax.aot --config=configs/tiny_hand.py --topology=cpu:8

configs/tiny.py's backbone, widths and 64 x 64 inputs with configs/hand_r50.py's
hand network, hierarchy (the embedded hand), hand model and hand loss. Pass
':fastmetro-S' (or -M, -L) for FastMETRO-Hand at the same size.
"""

from configs import hand_r50
from configs import tiny


def get_config(arg='coarsemetro'):
  """Tiny hand recipe; `arg` picks the network (hand_r50.NETWORKS)."""
  if arg not in hand_r50.NETWORKS:
    raise ValueError(
        f"configs/tiny_hand.py argument must be one of {', '.join(hand_r50.NETWORKS)}, got {arg!r}"
    )
  config = hand_r50.make_hand(tiny.get_config(arg.split('-')[0]), arg)
  config.num_epochs = 1  # tiny's (make_hand sets FastMETRO's 200)
  return config
