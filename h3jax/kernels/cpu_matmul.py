"""Skinny matmuls for CPU decoding: weights packed in column panels, a native kernel built on first use.

A decode step multiplies 1-32 rows by every weight matrix once, so it is bound by streaming the weights.
XLA:CPU runs those products on one thread (10-17 GB/s on the 2-core machines of this project, against
~30 GB/s of memory bandwidth), and its skinny GEMMs at batch 8 slower still. `panel_matmul.cc` reads a
weight packed as column panels `[P, I, 8]` (`pack_panels`: panel p holds columns 8p..8p+7, so each panel is
one contiguous stream), keeps a block of rows' accumulators in registers, and shares the panels among the
calling thread and XLA's intra-op pool. Measured for SmolLM2-135M's 30 layers (x @ W chained, one process):
25.8 -> 14.9 ms at 1 row, 57.6 -> 27.5 ms at 8 rows (`benchmarks/model_speed.py` has the decode rows).

The kernel is part of the library `native.py` builds with the machine's C++ compiler for this CPU. Without
a compiler, or with `H3JAX_CPU_KERNELS=0`, nothing is packed and XLA's dots run as before. `panel_matmul`
lowers to the kernel only on CPU and for at most MAX_ROWS rows; elsewhere (GPU, prefill) it is an XLA dot
over the panels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from h3jax.kernels import native

TARGET = "h3jax_panel_matmul_f32"
SYMBOL = "H3jaxPanelMatmulF32"
LANES = 8  # columns per panel (one 256-bit vector of float32)
MAX_ROWS = 32  # above this the product is compute-bound and XLA's GEMM is the better kernel


def available() -> bool:
  """Whether the kernel is built and registered (and not disabled by H3JAX_CPU_KERNELS=0)."""
  return native.ffi_target(TARGET, SYMBOL)


def packable(kernel_IO) -> bool:
  """A float32 [in, out] weight whose out dimension fills whole panels."""
  return kernel_IO.ndim == 2 and kernel_IO.dtype == jnp.float32 and kernel_IO.shape[1] % LANES == 0


def pack_panels(kernel_IO):
  """[in, out] -> [out / 8, in, 8] (column panels; out must be a multiple of 8)."""
  I, O = kernel_IO.shape
  if O % LANES:
    raise ValueError(f"out dimension {O} is not a multiple of {LANES}")
  return kernel_IO.reshape(I, O // LANES, LANES).transpose(1, 0, 2)


def unpack_panels(panels_PIL):
  """Inverse of pack_panels."""
  P, I, L = panels_PIL.shape
  return panels_PIL.transpose(1, 0, 2).reshape(I, P * L)


MAX_WEIGHTS = 8  # weights one kernel call multiplies the same rows by (panel_matmul.cc's kMaxWeights)


def _xla_matmuls(x_NI, *panels):
  outs = []
  for panels_PIL in panels:
    y_NPL = jnp.einsum("ni,pil->npl", x_NI, panels_PIL, preferred_element_type=jnp.float32)
    outs.append(y_NPL.reshape(x_NI.shape[0], -1).astype(x_NI.dtype))
  return tuple(outs)


def _kernel_matmuls(x_NI, *panels):
  outs = tuple(jax.ShapeDtypeStruct((x_NI.shape[0], p.shape[0] * LANES), jnp.float32) for p in panels)
  return tuple(jax.ffi.ffi_call(TARGET, outs, vmap_method="sequential")(x_NI, *panels))


def panel_matmuls(x_NI, panels: tuple | list) -> tuple:
  """x [N, in] @ each weight packed in `panels` -> a tuple of [N, out_j]. The native kernel on CPU for
  float32 and N <= MAX_ROWS, one call for the group (its threads are woken and waited for once); else an
  XLA dot over each weight's panels (prefill, other platforms, other dtypes). Each result equals
  panel_matmul(x, panels[j]) bit for bit."""
  panels = tuple(panels)
  if not panels:
    return ()
  fits = (x_NI.ndim == 2 and x_NI.shape[0] <= MAX_ROWS and x_NI.dtype == jnp.float32
          and all(p.dtype == jnp.float32 for p in panels) and available())
  if not fits:
    return _xla_matmuls(x_NI, *panels)
  outs = []
  for i in range(0, len(panels), MAX_WEIGHTS):
    group = panels[i:i + MAX_WEIGHTS]
    outs += jax.lax.platform_dependent(x_NI, *group, cpu=_kernel_matmuls, default=_xla_matmuls)
  return tuple(outs)


def panel_matmul(x_NI, panels_PIL):
  """x [N, in] @ the weight packed in `panels_PIL` -> [N, out] (panel_matmuls of one weight)."""
  return panel_matmuls(x_NI, (panels_PIL,))[0]
