"""Scale-out of Stage B: the mesh table and its errors, expert-parallel training from the CLI on
data x expert and fsdp x expert meshes (= one device), the compiled HLO's collectives, and
checkpoints restored onto other meshes (8 -> 4 -> 1 devices) that continue with the same loss."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import scale_fixtures as sf
from conftest import COLLECTIVE_TIMEOUTS, FAST_COMPILE_XLA_FLAGS, made_once
from h3jax.checkpoint import load_params
from h3jax.model.params import flatten_dict
from h3jax.train import hlo_comm, loop, lora, optim, sharding

REPO = pathlib.Path(__file__).resolve().parents[1]
# Slow-first (conftest): under xdist's default distribution the module then lands in one worker's first
# batch, so the other worker never sits waiting on the lock of the shared `runs` fixture (51 s idle once).
pytestmark = pytest.mark.slow
STEPS, EVERY = 3, 2  # checkpoints at steps 2 and 3: step 3 is the "next step" after a restore


def losses(workdir) -> dict:
  rows = [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r for r in rows if "train/loss" in r}  # eval rows share the step


# ----------------------------------------------------------------------------- table and errors

def _moe_tree():
  from h3jax.config import ModelConfig
  from h3jax.model import params as params_lib
  cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8, max_position_embeddings=64, num_experts=4,
                    num_experts_per_tok=2)
  p = params_lib.init_params(cfg, jax.random.key(0))
  return cfg, lora.add_lora(p, lora.FFN_TARGETS + lora.ATTN_TARGETS, 4, jax.random.key(1))


def test_spec_table_covers_dense_and_moe_trees_and_optimizer_state():
  cfg, p = _moe_tree()
  mesh = sharding.make_mesh(fsdp=2, expert=4)
  specs = {optim.path_str(k): v for k, v in flatten_dict(sharding.param_specs(p, mesh)).items()}
  assert set(specs) == {optim.path_str(k) for k in flatten_dict(p)}  # every leaf has a spec
  for name in ("gate_proj", "up_proj", "down_proj"):  # experts and their LoRA on the expert axis
    for leaf in ("kernel", "lora_a", "lora_b"):
      assert specs[f"layers/moe/experts/{name}/{leaf}"][:2] == (None, "expert"), (name, leaf)
  assert specs["layers/moe/experts/gate_proj/kernel"] == P(None, "expert", "fsdp", None)
  assert specs["layers/moe/experts/down_proj/kernel"] == P(None, "expert", None, "fsdp")
  assert specs["layers/attn/q_proj/kernel"] == P(None, "fsdp", None)
  assert specs["layers/moe/router/kernel"] == P(None, None, None)  # replicated
  assert specs["embed/embedding"] == P(None, None)  # vocab 259 does not split; D is never split
  # the dense tree (Stage A) on a tensor mesh: Megatron column / row splits
  from h3jax.model import params as params_lib
  dense = params_lib.init_params(cfg.replace(num_experts=0), jax.random.key(0))
  dspecs = flatten_dict(sharding.param_specs(dense, sharding.make_mesh(data=4, tensor=2)))
  assert dspecs[("layers", "mlp", "up_proj", "kernel")] == P(None, None, "tensor")
  assert dspecs[("layers", "mlp", "down_proj", "kernel")] == P(None, "tensor", None)
  # Adam moments take their parameter's sharding
  import optax
  tx = optax.adam(1e-3)
  opt = sharding.tree_shardings_like(jax.eval_shape(tx.init, p), p, mesh)
  mu = opt[0].mu
  assert mu["layers"]["moe"]["experts"]["up_proj"]["lora_b"].spec == specs["layers/moe/experts/up_proj/lora_b"]
  assert mu["layers"]["moe"]["experts"]["up_proj"]["kernel"].spec == P(None, "expert", "fsdp", None)


@pytest.mark.parametrize("shape,kw,msg", [
    ({"data": 3}, {}, r"needs 3 devices, which does not divide the 8 devices"),
    ({"data": -1, "expert": 3}, {}, r"fixed axes \(3 devices\) do not divide the 8 devices"),
    ({"data": -1, "fsdp": -1}, {}, r"at most one -1"),
    ({"pipeline": 2}, {}, r"unknown mesh axes \['pipeline'\]"),
    ({"expert": 4}, {"num_experts": 6}, r"mesh expert=4 does not divide the 6 experts"),
    ({"expert": 2}, {"num_experts": 0}, r"needs an MoE model"),
    ({"data": 2, "expert": 4}, {"num_experts": 4, "batch_size": 4}, r"batch of 4 rows does not divide over"),
])
def test_invalid_meshes_are_one_clear_error(shape, kw, msg):
  with pytest.raises(sharding.MeshError, match=msg):
    sharding.check_mesh(sharding.resolve_axes(shape, 8), **kw)


def test_mesh_uses_the_first_devices_and_minus_one_takes_the_rest():
  m = sharding.make_mesh(data=2, expert=2)
  assert m.axis_names == sharding.AXES and dict(m.shape) == {"data": 2, "fsdp": 1, "expert": 2, "tensor": 1}
  assert list(m.devices.flat) == jax.devices()[:4]
  assert dict(sharding.make_mesh(fsdp=-1, expert=4).shape)["fsdp"] == 2


# ----------------------------------------------------------------------------- training runs

TINY = dict(vocab_size=259, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=8, tie_word_embeddings=False)  # configs/tiny.py's model
MESHES = {"dxe": dict(data=2, expert=4), "fxe": dict(fsdp=2, expert=4)}


def step_hlo(root, name) -> str:
  return (root / name / loop.HLO_FILE).read_text()  # train.save_hlo=True: the compiled step


def _cli_run(root, name, base, experts, data, env, mesh):
  """One Stage B run of configs/tiny.py:fusion from the CLI, in its own process: a run that crashes
  XLA fails this test with the run's stderr instead of taking the pytest worker down with it."""
  cmd = [sys.executable, "-m", "h3jax.train", "--config=configs/tiny.py:fusion", f"--workdir={root / name}",
         *sf.fusion_overrides(base, experts, data, STEPS, EVERY), "--config.train.save_hlo=True",
         f"--config.train.eval_every={STEPS}",  # the eval step under the mesh too
         *(f"--config.mesh.{a}={v}" for a, v in mesh.items())]
  r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, f"{name}: exit {r.returncode}\n{r.stderr[-4000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """One-device, data x expert = 2x4 and fsdp x expert = 2x4 runs from the CLI on 8 host devices. Made
  once per pytest run (~70 s): under xdist the first worker to need them makes them in the run's common
  temporary folder, and a worker that gets this module's other tests waits on the lock and reads them."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}  # XLA_FLAGS gives the devices
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), PYTHONFAULTHANDLER="1",
             XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {COLLECTIVE_TIMEOUTS} {FAST_COMPILE_XLA_FLAGS}")

  def make(root):
    root.mkdir()
    base, experts = sf.write_models(root)
    data = sf.write_data(root / "d.jsonl")
    for name, mesh in {"one": {}, **MESHES}.items():
      _cli_run(root, name, base, experts, data, env, mesh)
    (root / "paths.json").write_text(json.dumps(dict(base=str(base), experts=[str(e) for e in experts],
                                                     data=str(data))))
  root = made_once(tmp_path_factory, "train_scale_runs", make)
  paths = json.loads((root / "paths.json").read_text())
  _, one = load_params(root / "one" / "checkpoints")
  return dict(root=root, one=one, env=env, **paths)


def test_cli_data_x_expert_and_fsdp_x_expert_equal_one_device(runs):
  ref = losses(runs["root"] / "one")
  for name in MESHES:
    got = losses(runs["root"] / name)
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in range(1, STEPS + 1):
      for k in ("train/loss", "train/lm_loss", "train/gate_loss", "train/grad_norm"):
        np.testing.assert_allclose(got[s][k], ref[s][k], rtol=2e-5, err_msg=f"{name} step {s} {k}")
      assert got[s]["train/dropped_tokens"] == 0.0  # dropless (capacity_factor=0)
    _, p = load_params(runs["root"] / name / "checkpoints")
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(runs["one"])):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5)
  assert ref[STEPS]["train/loss"] < ref[1]["train/loss"]
  ev = {n: [json.loads(l)["eval/lm_loss"] for l in (runs["root"] / n / "metrics.jsonl").read_text().splitlines()
            if "eval/lm_loss" in l] for n in ("one", *MESHES)}
  assert len(ev["one"]) == 1 and np.isfinite(ev["one"][0])
  for name in MESHES:  # the eval step under the mesh
    np.testing.assert_allclose(ev[name], ev["one"], rtol=2e-5, err_msg=name)


def test_capacity_plan_comm_model_matches_compiled_hlo(runs):
  """benchmarks/scale_plan.py's per-axis bytes vs the collectives of the compiled CPU train steps."""
  sys.path.insert(0, str(REPO / "benchmarks"))
  import scale_plan
  for name, mesh in MESHES.items():
    full = {a: mesh.get(a, 1) for a in sharding.AXES}
    got = hlo_comm.collective_bytes(step_hlo(runs["root"], name), full)
    s = scale_plan.Setting("tiny", full, batch_size=8, seq_len=32, param_dtype="float32", compute_dtype="float32",
                           num_experts=sf.N_EXPERTS, fields=TINY)
    want = scale_plan.plan(s)["comm_bytes"]
    total = sum(got.values())
    assert "expert" in want and sum(want.values()) > 0.5 * total
    for axes in set(got) | set(want):
      if max(got.get(axes, 0), want.get(axes, 0)) > 0.01 * total:  # ignore scalar reductions
        np.testing.assert_allclose(want.get(axes, 0), got.get(axes, 0), rtol=0.1, err_msg=f"{name} {axes}")


def _collectives(hlo: str):
  """(op, result shape) of every collective in an HLO module's text (each element of a tuple result)."""
  out = []
  for line in hlo.splitlines():
    m = hlo_comm._INSTR.match(line)
    if m and m.group(2).removesuffix("-start") in hlo_comm.OPS:
      out += [(m.group(2).removesuffix("-start"), f"{dt}[{dims}]") for dt, dims in hlo_comm._SHAPE.findall(m.group(1))]
  return out


def test_compiled_step_exchanges_tokens_and_never_gathers_all_experts(runs):
  for name in MESHES:
    ops = _collectives(step_hlo(runs["root"], name))
    assert any(op == "all-to-all" for op, _ in ops), ops
    # expert kernels are [E=4, 32, 64] / [E, 64, 32] per layer (and [L=2, E, ...] stacked): no collective
    # may produce all four experts' weights on one device (fsdp gathers one expert's [1, 32, 64])
    E, D, F = 4, 32, 64
    full = {f"[{E},{D},{F}]", f"[{E},{F},{D}]", f"[2,{E},{D},{F}]", f"[2,{E},{F},{D}]"}
    gathers = [(op, s) for op, s in ops if op == "all-gather"]
    assert not [s for _, s in gathers if any(s.endswith(f) for f in full)], (name, gathers)
    if name == "fxe":  # fsdp does gather weights, one expert at a time
      assert any(s.endswith(f"[1,1,{D},{F}]") for _, s in gathers), gathers


def _resume_on(runs, name, export=False, **mesh):
  """A fresh workdir holding only the 2x4 run's step-2 checkpoint, continued to step 3 on `mesh`."""
  w = runs["root"] / name
  (w / "checkpoints").mkdir(parents=True)
  shutil.copytree(runs["root"] / "dxe" / "checkpoints" / str(EVERY), w / "checkpoints" / str(EVERY))
  c = sf.fusion_config(runs["base"], runs["experts"], runs["data"], STEPS, EVERY, **mesh)
  c.export.enabled = export
  out = loop.train_and_evaluate(c, w)
  return losses(w)[STEPS], out


def test_restore_onto_other_meshes_continues_with_the_same_loss_and_exports(runs):
  want = losses(runs["root"] / "dxe")[STEPS]
  got4, out4 = _resume_on(runs, "to4", export=True, expert=4)  # 8 devices (2x4) -> 4 (1x4)
  got1, out1 = _resume_on(runs, "to1", export=True)  # -> 1 device
  for got in (got4, got1):
    for k in ("train/loss", "train/lm_loss", "train/gate_loss"):
      np.testing.assert_allclose(got[k], want[k], rtol=2e-5, err_msg=k)
  assert len(out4["params"]["layers"]["moe"]["experts"]["up_proj"]["kernel"].sharding.device_set) == 4
  # HF export from the 4-device mesh equals the one from one device (Mixtral folder)
  from h3jax.hf.load import load_pretrained
  cfg4, p4 = load_pretrained(out4["export_dir"])
  cfg1, p1 = load_pretrained(out1["export_dir"])
  assert cfg4.num_experts == 4 and json.loads((pathlib.Path(out4["export_dir"]) / "config.json").read_text())[
      "architectures"] == ["MixtralForCausalLM"]
  for a, b in zip(jax.tree.leaves(p4), jax.tree.leaves(p1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5)


def test_cli_invalid_mesh_is_one_error_line(runs, tmp_path):
  cmd = [sys.executable, "-m", "h3jax.train", "--config=configs/tiny.py:fusion", f"--workdir={tmp_path / 'w'}",
         *sf.fusion_overrides(runs["base"], runs["experts"], runs["data"]), "--config.mesh.expert=3"]
  r = subprocess.run(cmd, cwd=REPO, env=runs["env"], capture_output=True, text=True, timeout=300)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1] == ("error: mesh {'data': 1, 'fsdp': 1, 'expert': 3, 'tensor': 1} "
                                               "needs 3 devices, which does not divide the 8 devices")
  assert not (tmp_path / "w").exists()  # nothing written
