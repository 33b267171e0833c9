"""Hand mesh recovery with an HRNet-W64: CoarseMETRO-Hand-S, or FastMETRO-Hand-{S,M,L}.

  # FastMETRO's released FreiHAND checkpoint (kind fastmetro-L-h64-hand, from its keys)
  python -m coarsemetro_jax.convert --src=FastMETRO-L-H64_freihand_state_dict.bin \
      --out=runs/converted/FastMETRO-L-H64_freihand --config=configs/hand_h64.py:fastmetro-L
  python -m coarsemetro_jax.profile --config=configs/hand_h64.py:fastmetro-L \
      --config.topology.hierarchy=/data/mano/mano_downsampling.npz
  python main.py --config=configs/hand_h64.py --workdir=runs/hand_h64 \
      --config.data.train_yaml=/data/freihand/train.yaml \
      --config.data.eval_yaml=/data/freihand/test.yaml \
      --config.topology.hierarchy=/data/mano/mano_downsampling.npz \
      --config.topology.adjmat_prefix=/data/mano/mano_195_adjmat \
      --config.init_from=runs/hrnet_w64_imagenet

configs/hand_r50.py with configs/h64.py's backbone and batch (the argument,
topology, schedule and CoarseMETRO-Hand token counts are documented there).
FastMETRO-L-H64 on FreiHAND (released checkpoint): PA-MPJPE 6.5 mm,
PA-MPVPE 7.1 mm, F@5 mm 0.687, F@15 mm 0.983.
"""

from configs import h64
from configs import hand_r50


def get_config(arg='coarsemetro'):
  """Hand recipe with an HRNet-W64; `arg` picks the network (hand_r50.NETWORKS)."""
  return hand_r50.make_hand(h64.get_config(), arg)
