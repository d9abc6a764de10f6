"""The machine's matmul peak (FLOP/s): measured by square products, and the vendors' nominal peaks."""

import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Square matmul sizes tried for the peak, per platform (our design: large enough to saturate).
PEAK_SIZES = {'cpu': (512, 1024, 2048), 'gpu': (4096, 8192), 'tpu': (4096, 8192)}
# Vendor dense bfloat16 peaks (FLOP/s, vendors' data sheets) by `device_kind` substring, first match
# wins; reported next to the measured peak on accelerators.
NOMINAL_BFLOAT16_PEAKS = (
    ('H200', 989e12), ('H100 PCIe', 756e12), ('H100', 989e12), ('A100', 312e12), ('L40S', 362e12),
    ('L4', 121e12), ('A10G', 70e12), ('TPU v5 lite', 197e12), ('TPU v5e', 197e12), ('TPU v5p', 459e12),
    ('TPU v5', 459e12), ('TPU v4', 275e12), ('TPU v6', 918e12))


def nominal_peak(device_kind: str, dtype: str) -> float | None:
  """The vendor's dense bfloat16 peak of an accelerator (None for CPUs, float32, unknown devices)."""
  if dtype != 'bfloat16':
    return None
  for name, flops in NOMINAL_BFLOAT16_PEAKS:
    if name.lower() in device_kind.lower():
      return flops
  return None


def _matmul(size: int, dtype: str, accumulate: str | None = None
            ) -> tuple[Callable[[], jax.Array], float]:
  """A compiled [size, size] @ [size, size] product and its FLOPs; the output is in `accumulate`
  (e.g. float32 for bfloat16 inputs), else in `dtype`."""
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.dtype(dtype))
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.dtype(dtype))
  product = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=accumulate)
                    ).lower(a, b).compile()
  return (lambda: product(a, b)), 2.0 * size ** 3


def _seconds(fn: Callable[[], Any]) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


class PeakProbe:
  """Measures the matmul peak (FLOP/s) of one dtype and re-measures it between train steps.

  A measurement is the throughput of a block of back-to-back products lasting about
  `block_seconds` (sustained, not a burst). Products narrower than float32 are measured both with
  outputs in that dtype and accumulated into float32 outputs (`preferred_element_type`, the form the
  model's attention uses): CPUs with AMX or AVX512-BF16 only run the second form at full speed
  (on a Sapphire Rapids VM: ~1000 vs ~170 GFLOP/s in bfloat16). The start value is the best
  product's median over `repeats` blocks; `peak` is the highest measurement so far (the probes
  between train steps included), so a busy machine can only lower the MFU computed from it, never
  raise it.
  """

  def __init__(self, dtype: str, sizes: Sequence[int] | None = None, repeats: int = 3,
               block_seconds: float = 0.2):
    sizes = sizes or PEAK_SIZES.get(jax.default_backend()) or (4096, 8192)
    outputs = (None,) if jnp.dtype(dtype).itemsize >= 4 else (None, 'float32')
    self.dtype = dtype
    self.by_product, products = {}, {}  # '<size>' or '<size>->float32' -> FLOP/s
    for size in sizes:
      for accumulate in outputs:
        name = f'{size}->{accumulate}' if accumulate else str(size)
        fn, flops = _matmul(size, dtype, accumulate)
        fn()
        count = max(1, int(round(block_seconds / _seconds(fn))))
        products[name] = (fn, flops, count)
        self.by_product[name] = float(
            np.median([self._block(fn, flops, count) for _ in range(repeats)]))
    self.product = max(self.by_product, key=self.by_product.get)
    self._product = products[self.product]
    self.samples: list[float] = [self.by_product[self.product]]

  @property
  def peak(self) -> float:
    """The highest throughput measured so far (FLOP/s)."""
    return max(self.samples)

  @staticmethod
  def _block(fn: Callable[[], jax.Array], flops: float, count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
      out = fn()
    jax.block_until_ready(out)
    return flops * count / (time.perf_counter() - start)

  def sample(self) -> float:
    """One block of products of the best size; the FLOP/s are recorded in `samples`."""
    rate = self._block(*self._product)
    self.samples.append(rate)
    return rate

  def report(self) -> dict:
    """JSON-able: dtype, `flops` (the peak), the best product, start values and all samples."""
    return {'dtype': self.dtype, 'flops': self.peak, 'product': self.product,
            'start_by_product': self.by_product, 'samples': self.samples}
