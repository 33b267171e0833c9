"""Hand mesh recovery with a ResNet-50: CoarseMETRO-Hand-S, or FastMETRO-Hand-{S,M,L}.

  python -m coarsemetro_jax.profile --config=configs/hand_r50.py \
      --config.topology.hierarchy=/data/mano/mano_downsampling.npz
  python -m coarsemetro_jax.profile --config=configs/hand_r50.py:fastmetro-S \
      --config.topology.hierarchy=/data/mano/mano_downsampling.npz
  python main.py --config=configs/hand_r50.py --workdir=runs/hand_r50 \
      --config.data.train_yaml=/data/freihand/train.yaml \
      --config.data.eval_yaml=/data/freihand/test.yaml \
      --config.topology.hierarchy=/data/mano/mano_downsampling.npz \
      --config.topology.adjmat_prefix=/data/mano/mano_195_adjmat \
      --config.init_from=runs/resnet50_imagenet

The argument picks the network: 'coarsemetro' (default) or 'fastmetro-S/M/L'
(`FastMETRO_Hand_Network`, 1/2/3 layers per transformer). Both are the hand
networks of config.model.hand: 21 joint tokens (FreiHAND's order), the 195
vertices of MANO's coarse mesh, and the fixed up-sampling U[0] of the hand
hierarchy to MANO's 778 vertices (no learned up-sampling layer).

Topology: `hierarchy` '' is the embedded CC0 hand; a user's real MANO files are
`mano_downsampling.npz` (GraphCMR's layout, as METRO and FastMETRO ship it)
and, optionally, FastMETRO's `mano_195_adjmat_{indices,values,size}.pt`
(`adjmat_prefix`; the same graph as the hierarchy's 195-vertex level plus
self-loops).

Hand model: `hand_model.path` '' is the embedded CC0 hand (the embedded
hierarchy's mesh); with MANO's hierarchy, point it at MANO's `MANO_RIGHT.pkl`
(`--config.hand_model.path=/data/mano/MANO_RIGHT.pkl`): the GT meshes, the 21
joints regressed from a mesh (MANO's 16 plus 5 fingertips) and the faces come
from it, and it must be the hierarchy's 778-vertex mesh.

Training follows FastMETRO's FreiHAND run: 200 epochs at lr 1e-4 (AdamW, the
body recipe's optimiser, clipping and batch of 16 x 4 GPUs are assumed the
same), METRO's hand augmentation (rotations with rot_factor 90, no flip), and
its hand loss (coarsemetro_jax/hand_losses.py): the body's weights
for 3D joints (1000), vertices (100) and 2D joints (100), vertices 0.5 / 0.5 at
195 / 778, and the edge-length (1.0) and normal (0.1) terms on the 778 mesh at
weight 100, always on. Evaluation: PA-MPJPE, PA-MPVPE, F@5 mm and F@15 mm
(FreiHAND's). Data paths are the user's (FreiHAND in METRO's TSV format).

CoarseMETRO-Hand's stage vertex-token counts (`vertex_tokens`) keep the body
recipe's token density per stage relative to the coarse mesh: the body's
48 / 192 / 384 tokens are 11 % / 45 % / 89 % of its 431 coarse vertices; on
the hand's 195 these are 21.7 / 86.9 / 173.7, rounded up to multiples of 8
(TPU tile rows): 24 / 88 / 176. The first stage thus starts from 24 tokens
for 21 joints (body: 48 for 14), each stage up-samples about 4x then 2x as
the body's, and the last learned token map (176 -> 195) stays almost square,
like the body's 384 -> 431. Widths are the body recipe's (512 -> 128 -> 64):
FastMETRO's hand network keeps its body widths too. `python -m
coarsemetro_jax.profile` gives CoarseMETRO-Hand-S-R50 next to FastMETRO-Hand.
"""

import ml_collections

from configs import r50

NETWORKS = ('coarsemetro', 'fastmetro-S', 'fastmetro-M', 'fastmetro-L')
FASTMETRO_LAYERS = {'S': 1, 'M': 2, 'L': 3}
# MANO's 16 joints plus its 5 fingertips (FreiHAND's 21-joint set).
HAND_JOINTS = 21
# CoarseMETRO-Hand stage token counts (module docstring).
HAND_VERTEX_TOKENS = (24, 88, 176)


def make_hand(config, network):
  """`config` (a body recipe) turned into the hand recipe of `network` (one of NETWORKS)."""
  if network not in NETWORKS:
    raise ValueError(f"hand config argument must be one of {', '.join(NETWORKS)}, got {network!r}")
  name, _, size = network.partition('-')
  config.model.name = name
  config.model.hand = True
  config.model.num_joints = HAND_JOINTS
  config.model.vertex_tokens = HAND_VERTEX_TOKENS
  if name == 'fastmetro':
    config.model.fastmetro_layers = FASTMETRO_LAYERS[size]
  # '' = the embedded hand; the real MANO files as in the module docstring.
  config.topology.hierarchy = ''
  config.topology.adjmat_prefix = ''
  config.hand_model = ml_collections.ConfigDict()
  config.hand_model.path = ''  # '' = the embedded hand; MANO_RIGHT.pkl
  # FastMETRO's hand loss (module docstring); no intermediate mesh level.
  config.loss.vertices_coarse = 0.5  # 195
  config.loss.vertices_intermediate = 0.0
  config.loss.vertices_fine = 0.5  # 778
  config.loss.use_edge_normal = True
  config.loss.edge_normal = 100.0
  config.loss.edge_gt = 1.0
  config.loss.edge_self = 0.0
  config.loss.normal = 0.1
  config.loss.vertices_pa = 0.0  # 778 mesh after Procrustes, L1 (not in FastMETRO)
  # Left hands as they come (FreiHAND has right hands only); True mirrors them
  # into right hands first (coarsemetro_jax/hand_steps.py).
  config.mirror_left_hands = False
  # FastMETRO's FreiHAND schedule: 200 epochs at lr 1e-4.
  config.num_epochs = 200
  config.optim.lr = 1e-4
  # METRO's FreiHAND augmentation rotates by N(0, 90) degrees clipped to +-180
  # (the body's 30): hands are seen at every in-plane angle.
  config.data.rot_factor = 90.0
  return config


def get_config(arg='coarsemetro'):
  """Hand recipe with a ResNet-50; `arg` picks the network (NETWORKS)."""
  return make_hand(r50.get_config(), arg)
