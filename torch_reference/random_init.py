"""Random weights for parity tests (PyTorch's default init is too tame for them)."""

import torch
from torch import nn


def randomize_(model, seed=0):
  """Random parameters everywhere, non-trivial BatchNorm statistics; in place."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, nn.modules.batchnorm._BatchNorm):
        module.weight.uniform_(0.5, 1.0, generator=g)
        module.bias.normal_(0.0, 0.1, generator=g)
        module.running_mean.normal_(0.0, 0.2, generator=g)
        module.running_var.uniform_(0.5, 2.0, generator=g)
        module.num_batches_tracked.fill_(7)
      elif isinstance(module, nn.LayerNorm):
        module.weight.normal_(1.0, 0.1, generator=g)
        module.bias.normal_(0.0, 0.1, generator=g)
    done = {
        id(p)
        for m in model.modules()
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm))
        for p in m.parameters(recurse=False)
    }
    for param in model.parameters():
      if id(param) in done:
        continue
      fan_in = param[0].numel() if param.ndim > 1 else 10
      param.normal_(0.0, fan_in**-0.5, generator=g)
  return model
