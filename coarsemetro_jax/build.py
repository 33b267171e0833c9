"""The one model builder: mesh topology, body model and model of a config.

  topology, body, model = build.build(config)

`config.topology.hierarchy` names the mesh hierarchy ('' = the embedded body),
`config.topology.adjmat_prefix` optionally FastMETRO's decoder adjacency files
(`<prefix>_{indices,values,size}.pt`), and `config.body_model` the body model.

With `config.model.hand` the network is the hand network and the hierarchy a
hand one: MANO's `mano_downsampling.npz` ('' = the embedded hand), its levels
778 and 195, with `mano_195_adjmat` as the optional adjacency files.
"""

import typing

import flax.linen as nn

from coarsemetro_jax import body_model as body_model_lib
from coarsemetro_jax import mesh_topology
from coarsemetro_jax import models
from coarsemetro_jax.convert import adjacency


class Built(typing.NamedTuple):
  topology: mesh_topology.MeshTopology
  body: body_model_lib.BodyModel | None  # None when built with body=False
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


def load_body_model(config):
  if is_hand(config):
    # Hand losses and metrics need the MANO-format hand model, which this
    # builder does not load yet.
    raise ValueError(
        'config.model.hand: training and evaluating the hand network need the hand model, '
        'which build.build does not load yet; build(config, body=False) builds the network'
    )
  return body_model_lib.load_body_model(config.body_model.path, config.body_model.h36m_regressor)


def build(config, body=True):
  """Topology, body model and model of `config`.

  Args:
    config: a training/model config (`topology`, `body_model`, `model` fields).
    body: also load the body model; without it `Built.body` is None (inference
      and export need no body model to run the network).
  """
  topology = load_topology(config)
  body_model = load_body_model(config) if body else None
  return Built(topology, body_model, models.build_model(config.model, topology))
