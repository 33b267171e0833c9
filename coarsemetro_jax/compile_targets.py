"""What `aot` compiles for: the devices of a TPU slice, N CPUs or the local ones, and their chip.

A TPU slice's devices come from libtpu's compile-only client (no TPU needed);
each chip's HBM and peak bf16 rate are the vendor's published figures.
"""

import dataclasses

import jax

GB = 1e9


class TargetError(ValueError):
  """An unknown or unusable --topology (one line for the user)."""


def first_line(e):
  """The first non-blank line of an exception's message (or its type's name)."""
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return lines[0] if lines else type(e).__name__


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published per-chip figures of an accelerator."""

  name: str
  hbm_bytes: float
  peak_bf16_flops: float  # FLOP/s


# Per-chip HBM and peak bf16 compute, from the vendor's published specifications.
CHIPS = {
    # Google Cloud TPU documentation, "TPU v4" (system architecture table): peak
    # compute per chip 275 teraflops (bf16 or int8); HBM2 capacity 32 GiB.
    'v4': Chip('TPU v4', 32 * 2**30, 275e12),
    # Google Cloud TPU documentation, "TPU v5e" (system architecture table): peak
    # compute per chip (bf16) 197 TFLOPs; HBM capacity per chip 16 GB.
    'v5e': Chip('TPU v5e', 16 * GB, 197e12),
    # Google Cloud TPU documentation, "TPU v5p" (system architecture table): peak
    # compute per chip (bf16) 459 TFLOPs; HBM2e capacity 95 GB.
    'v5p': Chip('TPU v5p', 95 * GB, 459e12),
    # Google Cloud TPU documentation, "TPU v6e" (system architecture table): peak
    # compute per chip (bf16) 918 TFLOPs; HBM capacity per chip 32 GB.
    'v6e': Chip('TPU v6e', 32 * GB, 918e12),
}
# jax Device.device_kind of each chip.
DEVICE_KINDS = {'TPU v4': 'v4', 'TPU v5 lite': 'v5e', 'TPU v5': 'v5p', 'TPU v6 lite': 'v6e'}


@dataclasses.dataclass(frozen=True)
class Target:
  """The devices to compile for and what one chip offers."""

  name: str
  devices: tuple
  devices_per_chip: int
  chip: Chip | None  # None: no published figures (CPU, an unlisted GPU)

  @property
  def num_chips(self):
    return len(self.devices) // self.devices_per_chip


def _devices_per_chip(devices):
  """TPU v4 exposes each chip's two TensorCores as two devices; others one."""
  coords = {tuple(getattr(d, 'coords', (d.id,))) for d in devices}
  return len(devices) // len(coords)


def cpu_devices(n):
  """N host CPU devices; asks for them before JAX's CPU backend starts."""
  try:
    jax.config.update('jax_num_cpu_devices', n)
  except RuntimeError:  # backend already running: use what it has
    pass
  available = jax.devices('cpu')
  if n > len(available):
    raise TargetError(
        f'--topology=cpu:{n}: JAX already started with {len(available)} CPU '
        f'devices; run with XLA_FLAGS=--xla_force_host_platform_device_count={n}'
    )
  return tuple(available[:n])


def tpu_devices(name):
  """The devices of TPU slice `name` (e.g. 'v5e:4x4'), from libtpu's compile-only client."""
  from jax.experimental import topologies

  try:
    return tuple(topologies.get_topology_desc(platform='tpu', topology_name=name).devices)
  except Exception as e:
    message = first_line(e)
    if 'not installed' in message:
      raise TargetError(
          f'--topology={name} needs libtpu: pip install -r ' 'requirements-tpu.txt'
      ) from e
    if 'lockfile' in message:
      raise TargetError(
          f'--topology={name}: another process holds libtpu '
          '(/tmp/libtpu_lockfile); wait for it, or set '
          'ALLOW_MULTIPLE_LIBTPU_LOAD=1 if it uses no TPU'
      ) from e
    raise TargetError(
        f'--topology={name}: not a TPU topology libtpu knows '
        f'(e.g. v5e:4x4, v5p:2x2x2, v4:2x2x1, v6e:4x4): {message}'
    ) from e


def local_chip(device):
  """Published figures of a local device; a GPU's HBM from its runtime."""
  if device.device_kind in DEVICE_KINDS:
    return CHIPS[DEVICE_KINDS[device.device_kind]]
  if device.platform == 'gpu':
    stats = device.memory_stats() or {}
    if 'bytes_limit' in stats:
      # The bytes XLA's allocator may use on this GPU (its whole HBM less the
      # runtime's reserve); no published peak here: --peak_tflops gives one.
      return Chip(device.device_kind, float(stats['bytes_limit']), float('nan'))
  return None


def make_target(topology, peak_tflops=0.0):
  """`Target` of '--topology': 'cpu:N', a TPU slice name, or '' for the local devices."""
  if not topology:
    devices = tuple(jax.devices())
    chip = local_chip(devices[0])
    name = f'{len(devices)} x {devices[0].device_kind}'
  elif topology.startswith('cpu:'):
    n = topology[4:]
    if not n.isdigit() or int(n) < 1:
      raise TargetError(f"--topology={topology}: expected 'cpu:N' with N >= 1")
    devices, chip, name = cpu_devices(int(n)), None, topology
  else:
    devices, name = tpu_devices(topology), topology
    kind = devices[0].device_kind
    if kind not in DEVICE_KINDS:
      raise TargetError(
          f'--topology={topology}: no published figures for {kind!r} '
          f'(known: {sorted(DEVICE_KINDS)})'
      )
    chip = CHIPS[DEVICE_KINDS[kind]]
  if peak_tflops > 0:
    base = chip or Chip(devices[0].device_kind, float('nan'), float('nan'))
    chip = dataclasses.replace(base, peak_bf16_flops=peak_tflops * 1e12)
  return Target(name, devices, _devices_per_chip(devices), chip)
