"""PyTorch checkpoints <-> Flax variables (ResNet-50, FastMETRO-S/M/L, CoarseMETRO).

Modules:
  torch_file   `load(path)`: PyTorch .pth/.bin/.pt files (zip and legacy
               serialisations) without torch; restricted unpickler.
  torch_writer `save(tree, path)`: zip serialisation that torch.load reads.
  adjacency    `read_adjmat(prefix)`: FastMETRO's decoder adjacency files as arrays.
  tables       explicit module tables (name map + layout per module kind) and
               CoarseMETRO's PyTorch key layout (documented there).
  state_dict   `to_flax(state_dict, table, target)` / `to_torch(variables, table)`
               with strict accounting (`ConversionError`), `torch_shapes`.
  kinds        checkpoint kinds, `detect_kind`, `apply_kind`, `abstract_variables`.
  orbax_variables  `read_state_dict`, orbax `save_converted` / `read_converted`,
               and `restore_into(directory, variables)` for `config.init_from`.
  __main__     `python -m coarsemetro_jax.convert --src FILE --out DIR [--kind K]
               [--config configs/X.py[:arg]] [--to-torch]`.

Nothing here imports TensorFlow or torch.
"""
