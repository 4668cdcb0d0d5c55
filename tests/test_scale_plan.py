"""benchmarks/scale_plan.py (memory against a hand count) and h3jax.train.hlo_comm's HLO parsing.

The communication model is checked against compiled HLO in test_train_scale.py (it needs the runs)."""

import math
import pathlib
import sys

import numpy as np
import pytest

from h3jax.train import hlo_comm

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import scale_plan  # noqa: E402


def test_llama2_7b_x3_param_memory_matches_a_hand_count():
  mesh = {"data": 1, "fsdp": 8, "expert": 1, "tensor": 1}
  r = scale_plan.plan(scale_plan.Setting("llama2-7b-x3", mesh, batch_size=8, seq_len=512))
  V, D, F, L, E, r8 = 32000, 4096, 11008, 32, 3, 8
  attn = 4 * D * D
  lora = 4 * r8 * (D + D) + E * r8 * 3 * (D + F)  # q/k/v/o and every expert's gate/up/down, per layer
  frozen = 2 * V * D + D + L * (attn + E * 3 * D * F + 2 * D)
  router = L * D * E
  assert r["params_total_B"] * 1e9 == frozen + router + L * lora
  assert r["trainable_M"] * 1e6 == router + L * lora
  # bf16 weights: embedding (replicated: the lookup) + every other matrix split 8 ways; LoRA f32 replicated
  want = (2 * (V * D + D + L * 2 * D + router) + 2 * (V * D + L * (attn + E * 3 * D * F)) / 8
          + 4 * L * lora)
  np.testing.assert_allclose(r["memory_GB"]["params"] * 1e9, want, rtol=1e-9)
  # Adam mu + nu for LoRA (f32) and the router (bf16)
  np.testing.assert_allclose(r["memory_GB"]["optimizer"] * 1e9, 2 * (4 * L * lora + 2 * router), rtol=1e-9)
  assert set(r["comm_MB"]) == {"fsdp"}  # no expert axis: no all_to_all


def test_mixtral_on_v5p_64_uses_the_expert_axis_and_errors_for_bad_meshes(capsys):
  scale_plan.main(["--model=mixtral-8x7b", "--hw=v5p-64"])
  out = capsys.readouterr().out
  row = [l for l in out.splitlines() if l.startswith("| mixtral-8x7b")][0]
  assert "fsdp=8 expert=8" in row and "expert " in row.split("|")[-2]
  with pytest.raises(SystemExit, match="error: llama2-7b-x3 on 8xH100: mesh expert=4 does not divide the 3 experts"):
    scale_plan.main(["--model=llama2-7b-x3", "--hw=8xH100", "--mesh=expert=4,fsdp=2"])
  with pytest.raises(SystemExit, match=r"has 6 devices; 8xH100 has 8"):
    scale_plan.main(["--model=mixtral-8x7b", "--hw=8xH100", "--mesh=expert=3,fsdp=2"])


def test_expert_all_to_all_bytes_follow_tokens_and_capacity():
  mesh = {"data": 1, "fsdp": 1, "expert": 8, "tensor": 1}
  s = scale_plan.Setting("mixtral-8x7b", mesh, batch_size=16, seq_len=1024)
  dropless = scale_plan.plan(s)["comm_bytes"]["expert"]  # + the gradient all-reduce over `expert`
  n_loc = 16 * 1024 / 8  # tokens each device routes
  s.capacity_factor = 1.25
  C = math.ceil(1.25 * n_loc * 2 / 8)
  capped = scale_plan.plan(s)["comm_bytes"]["expert"]
  assert dropless - capped == 4 * 32 * 8 * (n_loc - C) * 4096 * 2  # 4 exchanges x L x E x slots x D x bf16


HLO = """HloModule m

%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %a2a = (f32[1,8]{1,0}, f32[1,8]{1,0}) all-to-all(%x, %y), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}
  %ag = f32[8,16]{1,0} all-gather(%z), replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}, dimensions={0}
  ROOT %t = (s32[], f32[4,8]) tuple(%i, %v)
}

%cond (p: (s32[], f32[4,8])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

ENTRY %main (x: f32[4,8]) -> f32[4,8] {
  %w = (s32[], f32[4,8]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %ar = bf16[1024]{0} all-reduce(%g), replica_groups=mesh['axis_0'=1,'axis_1'=4,'axis_2'=2], device_ids=([2,4]T(1,0)) \
{'axis_2'}, to_apply=%add
  %rs = f32[2,8]{1,0} reduce-scatter(%h), replica_groups=[2,4]<=[8], dimensions={0}
  ROOT %r = f32[4,8] get-tuple-element(%w), index=1
}
"""


def test_hlo_comm_counts_loop_trips_and_maps_replica_groups_to_axes():
  mesh = {"data": 2, "expert": 4}  # device id = data * 4 + expert
  got = hlo_comm.collective_bytes(HLO, mesh, by_op=True)
  assert got == {
      "expert/all-to-all": 3 * 2 * 8 * 4,  # in the 3-trip loop body
      "data/all-gather": 3 * 8 * 16 * 4,  # ids 0 and 4 (stride 4 on the 2x4 device grid)
      "data/all-reduce": 1024 * 2,  # ids laid out transposed: the axis_2 group is {0, 4}
      "expert/reduce-scatter": 2 * 8 * 4 * 4,  # its input: result x group of 4 ({0, 1, 2, 3})
  }
