"""The one model builder: mesh topology, body model and model of a config.

  topology, body, model = build.build(config)

`config.topology.hierarchy` names the mesh hierarchy ('' = the embedded body),
`config.topology.adjmat_prefix` optionally FastMETRO's decoder adjacency files
(`<prefix>_{indices,values,size}.pt`), and `config.body_model` the body model.
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


def load_topology(config):
  """The config's mesh hierarchy, with FastMETRO's adjacency files if it names them."""
  prefix = config.topology.adjmat_prefix
  if not prefix:
    return mesh_topology.load_topology(config.topology.hierarchy)
  return mesh_topology.load_topology(
      config.topology.hierarchy, adjacency.read_adjmat(prefix), adjmat_source=f'{prefix}_*.pt'
  )


def load_body_model(config):
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
