"""The CPU decode kernel (h3jax/kernels): products against float64, batch invariance, fallbacks, the build."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from h3jax.kernels import cpu_matmul, decode_attention, native

pytestmark = pytest.mark.skipif(not cpu_matmul.available(), reason="no C++ compiler: the kernel cannot be built")


def _data(N, I, O, seed=0):
  rs = np.random.RandomState(seed)
  return rs.standard_normal((N, I)).astype(np.float32), rs.standard_normal((I, O)).astype(np.float32)


def _assert_product(y, x, w):
  """Within float32 summation error of the terms: |y - x@w| <= 2e-6 sqrt(I) (|x| @ |w|), elementwise."""
  x64, w64 = x.astype(np.float64), w.astype(np.float64)
  bound = 2e-6 * np.sqrt(x.shape[1]) * (np.abs(x64) @ np.abs(w64))
  err = np.abs(np.asarray(y, np.float64) - x64 @ w64)
  assert np.all(err <= bound), float(np.max(err / np.maximum(bound, 1e-30)))


def _uses_kernel(fn, *args) -> bool:
  return cpu_matmul.TARGET in jax.jit(fn).lower(*args).as_text()


# Row counts hit every block (blocks of 8, then one block of the 1-7 rows left); out widths 8 to 1536 (1, 3
# and many panels, so every panel-group remainder); the SmolLM2 shapes; in widths down to 1.
@pytest.mark.parametrize("N,I,O", [(1, 576, 1536), (8, 576, 192), (5, 1536, 576), (2, 64, 8), (3, 33, 24),
                                   (4, 96, 40), (7, 8, 56), (9, 48, 16), (16, 48, 64), (17, 5, 72),
                                   (32, 64, 128), (6, 1, 16)])
def test_kernel_matches_float64_product(N, I, O):
  x, w = _data(N, I, O)
  fn = lambda x, p: cpu_matmul.panel_matmul(x, p)
  assert _uses_kernel(fn, x, cpu_matmul.pack_panels(w))
  _assert_product(jax.jit(fn)(x, cpu_matmul.pack_panels(jnp.asarray(w))), x, w)


def test_out_width_not_a_multiple_of_8_through_the_ffi_call():
  """The kernel stores only the real columns of a zero-padded last panel (pack_panels itself refuses)."""
  x, w = _data(3, 577, 13)
  with pytest.raises(ValueError, match="multiple of 8"):
    cpu_matmul.pack_panels(w)
  panels = cpu_matmul.pack_panels(jnp.pad(jnp.asarray(w), ((0, 0), (0, 3))))
  out = jax.ShapeDtypeStruct((3, 13), jnp.float32)
  y = jax.jit(lambda x, p: jax.ffi.ffi_call(cpu_matmul.TARGET, out, vmap_method="sequential")(x, p))(x, panels)
  _assert_product(y, x, w)


def test_rows_are_computed_alone_bit_for_bit():
  """Each row's sum runs in one order whatever block it falls in: a batch decodes as its rows would alone."""
  x, w = _data(13, 200, 48, seed=1)
  panels = cpu_matmul.pack_panels(jnp.asarray(w))
  fn = jax.jit(cpu_matmul.panel_matmul)
  full = np.asarray(fn(x, panels))
  for n in range(13):
    np.testing.assert_array_equal(np.asarray(fn(x[n:n + 1], panels))[0], full[n])
  np.testing.assert_array_equal(np.asarray(fn(x[3:7], panels)), full[3:7])


def test_a_group_of_weights_is_one_call_equal_to_each_alone():
  """q / k / v and gate / up share their input: one kernel call, each result bit-identical to its own call;
  more weights than one call takes are split into calls of MAX_WEIGHTS; an empty or 8-column one too."""
  rs = np.random.RandomState(6)
  x = rs.standard_normal((5, 96)).astype(np.float32)
  ws = [rs.standard_normal((96, o)).astype(np.float32) for o in (64, 8, 24, 136, 8, 16, 40, 8, 32, 0, 48)]
  panels = [jnp.asarray(w.reshape(96, -1, 8).transpose(1, 0, 2)) for w in ws]  # the 0-column one too
  group = lambda x, *ps: cpu_matmul.panel_matmuls(x, ps)
  hlo = jax.jit(group).lower(x, *panels[:3]).as_text()
  assert hlo.count(cpu_matmul.TARGET) == 1
  ys = jax.jit(group)(x, *panels)
  assert len(ys) == len(ws) and jax.jit(group).lower(x, *panels).as_text().count(cpu_matmul.TARGET) == 2
  one = jax.jit(cpu_matmul.panel_matmul)
  for y, w, p in zip(ys, ws, panels):
    assert y.shape == (5, w.shape[1])
    np.testing.assert_array_equal(np.asarray(y), np.asarray(one(x, p)))
    _assert_product(y, x, w)
  assert cpu_matmul.panel_matmuls(x, ()) == ()


def test_zeros_and_non_finite_rows():
  x, w = _data(4, 64, 32, seed=2)
  x[1] = 0.0
  x[2, 5] = np.nan
  w[:, 8:16] = 0.0  # an all-zero panel, as LoRA-untouched deltas would give
  y = np.asarray(jax.jit(cpu_matmul.panel_matmul)(x, cpu_matmul.pack_panels(jnp.asarray(w))))
  np.testing.assert_array_equal(y[1], 0.0)
  assert np.all(np.isnan(y[2]))
  np.testing.assert_array_equal(y[[0, 3], 8:16], 0.0)
  _assert_product(y[[0, 3]], x[[0, 3]], w)


def test_many_rows_and_other_dtypes_take_xla_dots():
  x, w = _data(cpu_matmul.MAX_ROWS + 1, 40, 24, seed=3)
  panels = cpu_matmul.pack_panels(jnp.asarray(w))
  assert not _uses_kernel(cpu_matmul.panel_matmul, x, panels)
  _assert_product(jax.jit(cpu_matmul.panel_matmul)(x, panels), x, w)
  xb, pb = jnp.asarray(x[:4], jnp.bfloat16), panels.astype(jnp.bfloat16)
  assert not _uses_kernel(cpu_matmul.panel_matmul, xb, pb)
  np.testing.assert_array_equal(np.asarray(cpu_matmul.panel_matmul(xb, pb), np.float32),
                                np.asarray(xb @ cpu_matmul.unpack_panels(pb), np.float32))


def test_under_vmap_and_scan():
  x, w = _data(3 * 2, 32, 16, seed=4)
  panels = cpu_matmul.pack_panels(jnp.asarray(w))
  y = jax.jit(jax.vmap(cpu_matmul.panel_matmul, in_axes=(0, None)))(x.reshape(3, 2, 32), panels)
  _assert_product(np.asarray(y).reshape(6, 16), x, w)
  _, ys = jax.lax.scan(lambda c, xr: (c, cpu_matmul.panel_matmul(xr, panels)), 0, x.reshape(3, 2, 32))
  np.testing.assert_array_equal(np.asarray(ys), np.asarray(y))


def test_pack_round_trip():
  w = np.arange(5 * 24, dtype=np.float32).reshape(5, 24)
  p = cpu_matmul.pack_panels(w)
  assert p.shape == (3, 5, 8)
  np.testing.assert_array_equal(np.asarray(p[1, 2]), w[2, 8:16])
  np.testing.assert_array_equal(np.asarray(cpu_matmul.unpack_panels(p)), w)


def test_disabled_by_environment(monkeypatch):
  monkeypatch.setenv(native.ENABLE_ENV, "0")
  assert not cpu_matmul.available()
  x, w = _data(2, 16, 8)
  assert not _uses_kernel(cpu_matmul.panel_matmul, x, cpu_matmul.pack_panels(w))


def test_no_compiler_falls_back_with_one_warning(monkeypatch, tmp_path, caplog):
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
  monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "cache"))
  monkeypatch.setattr(native, "_state", {})
  monkeypatch.setattr(native, "_targets", {})
  with caplog.at_level(logging.WARNING, logger=native.__name__):  # both kernels' targets: one warning
    assert not cpu_matmul.available() and not cpu_matmul.available() and not decode_attention.available()
  assert len(caplog.records) == 1 and "no C++ compiler" in caplog.records[0].getMessage()
  x, w = _data(2, 16, 8)
  assert not _uses_kernel(cpu_matmul.panel_matmul, x, cpu_matmul.pack_panels(w))
  _assert_product(cpu_matmul.panel_matmul(x, cpu_matmul.pack_panels(w)), x, w)


def test_failed_build_leaves_nothing(monkeypatch, tmp_path):
  fake = tmp_path / "cxx"
  fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo fake 1.0 && exit 0\necho 'error: broken' >&2\nexit 1\n")
  fake.chmod(0o755)
  monkeypatch.setenv("CXX", str(fake))
  with pytest.raises(RuntimeError, match="error: broken"):
    native.build(tmp_path / "cache")
  assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.name != ".lock"]


def test_build_is_cached_per_cpu(monkeypatch, tmp_path):
  lib = native.build(tmp_path)
  stamp = lib.stat().st_mtime_ns
  assert native.build(tmp_path) == lib and lib.stat().st_mtime_ns == stamp  # not rebuilt
  assert not list(lib.parent.glob(".build-*"))
  monkeypatch.setattr(native, "_cpu_identity", lambda: "another cpu")
  monkeypatch.setenv("CXX", "/bin/false")  # a different CPU needs its own build: this one must fail
  with pytest.raises(RuntimeError):
    native.build(tmp_path)


def test_the_build_takes_the_requested_march(monkeypatch, tmp_path):
  """H3JAX_KERNEL_MARCH=haswell (make test-portable) builds the AVX2 code paths, cached apart from native."""
  args = tmp_path / "args"
  fake = tmp_path / "cxx"  # records its arguments and writes the -o file
  fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo fake 1.0 && exit 0\necho \"$@\" > " + str(args) +
                  "\nwhile [ $# -gt 1 ]; do [ \"$1\" = -o ] && touch \"$2\"; shift; done\n")
  fake.chmod(0o755)
  monkeypatch.setenv("CXX", str(fake))
  monkeypatch.delenv(native.MARCH_ENV, raising=False)
  native_lib = native.build(tmp_path / "cache")
  assert "-march=native" in args.read_text().split()
  monkeypatch.setenv(native.MARCH_ENV, "haswell")
  haswell_lib = native.build(tmp_path / "cache")
  assert "-march=haswell" in args.read_text().split() and "-march=native" not in args.read_text().split()
  assert haswell_lib.parent != native_lib.parent and native_lib.is_file()
