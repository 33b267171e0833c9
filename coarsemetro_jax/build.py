"""The one model builder: mesh topology, body model and model of a config.

  topology, body, model = build.build(config)

`config.topology.hierarchy` names the mesh hierarchy ('' = the embedded body),
`config.topology.adjmat_prefix` optionally FastMETRO's decoder adjacency files
(`<prefix>_{indices,values,size}.pt`), and `config.body_model` the body model.

With `config.model.hand` the network is the hand network and the hierarchy a
hand one: MANO's `mano_downsampling.npz` ('' = the embedded hand), its levels
778 and 195, with `mano_195_adjmat` as the optional adjacency files; in place
of the body model, `Built.body` is then the hand model of
`config.hand_model.path` ('' = the embedded hand, else MANO_RIGHT.pkl or a .npz
with MANO's keys), which must be the hierarchy's 778 mesh.
"""

import typing

import flax.linen as nn
import numpy as np

from coarsemetro_jax import body_model as body_model_lib
from coarsemetro_jax import hand_model as hand_model_lib
from coarsemetro_jax import mesh_topology
from coarsemetro_jax import models
from coarsemetro_jax.convert import adjacency


class Built(typing.NamedTuple):
  topology: mesh_topology.MeshTopology
  # The body model (the hand model for a hand config); None when built with body=False.
  body: body_model_lib.BodyModel | hand_model_lib.HandModel | None
  model: nn.Module


def is_hand(config):
  """Whether `config` builds the hand network (`config.model.hand`; absent = body)."""
  return bool(config.model.get('hand', False))


def load_topology(config):
  """The config's mesh hierarchy, with FastMETRO's adjacency files if it names them."""
  load = mesh_topology.load_hand_topology if is_hand(config) else mesh_topology.load_topology
  prefix = config.topology.adjmat_prefix
  if not prefix:
    return load(config.topology.hierarchy)
  return load(
      config.topology.hierarchy, adjacency.read_adjmat(prefix), adjmat_source=f'{prefix}_*.pt'
  )


def load_body_model(config, topology=None):
  """The body model of `config`, or its hand model for a hand config (`load_hand_model`)."""
  if is_hand(config):
    return load_hand_model(config, topology)
  return body_model_lib.load_body_model(config.body_model.path, config.body_model.h36m_regressor)


def load_hand_model(config, topology=None):
  """The hand model of `config.hand_model.path`, checked against the hand `topology`.

  Raises:
    hand_model.HandModelError: the file is unusable, or its mesh is not the
      hierarchy's 778-vertex level (another vertex count or other faces).
  """
  if 'hand_model' not in config:
    raise hand_model_lib.HandModelError(
        'config.hand_model is missing: a hand config names its hand model in '
        "config.hand_model.path ('' = the embedded hand; configs/hand_r50.py)"
    )
  path = config.hand_model.path
  hand = hand_model_lib.load_hand_model(path)
  if topology is not None:
    check_hand_matches(hand, topology, path or 'the embedded hand')
  return hand


def check_hand_matches(hand, topology, name):
  """Raises HandModelError unless `hand`'s mesh is `topology`'s level 0 (same faces)."""
  same = hand.num_vertices == topology.num_vertices[0]
  if same:
    faces = lambda f: {tuple(t) for t in np.sort(np.asarray(f), 1).tolist()}
    same = faces(hand.faces) == faces(topology.faces[0])
  if not same:
    raise hand_model_lib.HandModelError(
        f'config.hand_model.path ({name}: {hand.num_vertices} vertices, '
        f'{len(hand.faces)} faces) is not the mesh of the hand hierarchy '
        f'config.topology.hierarchy ({topology.source or "embedded"}: '
        f'{topology.num_vertices[0]} vertices, {len(topology.faces[0])} faces); '
        "use MANO's model with MANO's mano_downsampling.npz, or '' for both (the embedded hand)"
    )


def build(config, body=True):
  """Topology, body model and model of `config`.

  Args:
    config: a training/model config (`topology`, `body_model`, `model` fields).
    body: also load the body model (the hand model for a hand config);
      without it `Built.body` is None (inference and export need no body
      model to run the network).
  """
  topology = load_topology(config)
  body_model = load_body_model(config, topology) if body else None
  return Built(topology, body_model, models.build_model(config.model, topology))
