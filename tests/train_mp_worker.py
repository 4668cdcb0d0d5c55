"""One process of the two-process sharded train-step test (tests/test_train_multiprocess.py).

usage: python tests/train_mp_worker.py PORT PROCESS_ID OUT_DIR [dense_tp|moe_ep]
dense_tp (default): each process owns 2 CPU devices; the global (data=2, tensor=2) mesh spans both.
moe_ep: each process owns 4 CPU devices; a (data=2, expert=4) mesh over both runs the 4-expert MoE
with moe_dispatch="expert_parallel" (tokens cross processes in the all_to_all).
"""

import sys

import jax

port, pid, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
mode = sys.argv[4] if len(sys.argv) > 4 else "dense_tp"
local = {"dense_tp": 2, "moe_ep": 4}[mode]
jax.config.update("jax_num_cpu_devices", local)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                           initialization_timeout=120)

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

import test_train_step as tts  # noqa: E402
from h3jax.train import sharding  # noqa: E402

assert jax.device_count() == 2 * local and jax.local_device_count() == local, (jax.device_count(),
                                                                               jax.local_device_count())
if mode == "moe_ep":
  cfg, params, labels, lc, batches = tts.mp_problem(num_experts=4)
  cfg = cfg.replace(moe_dispatch="expert_parallel")
  mesh = sharding.make_mesh(data=2, expert=4)
else:
  cfg, params, labels, lc, batches = tts.mp_problem()
  mesh = sharding.make_mesh(data=2, tensor=2)


def global_array(x, shard):
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, shard, lambda idx: x[idx])


p_sh = sharding.param_shardings(params, mesh)
b_sh = sharding.batch_shardings(batches[0], mesh)
params_g = jax.tree.map(global_array, params, p_sh)
with jax.set_mesh(mesh):  # expert_parallel's shard_map takes the `expert` axis from here
  state, ms = tts.sharded_steps(cfg, params_g, labels, lc, [jax.tree.map(global_array, b, b_sh) for b in batches],
                                mesh)
host = multihost_utils.process_allgather(state["params"], tiled=True)
if pid == 0:
  flat = {"/".join(str(k.key) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(host)[0]}
  np.savez(f"{out}/params.npz", **flat, __losses__=np.asarray([m["loss"] for m in ms]))
jax.distributed.shutdown()
print("worker", pid, "ok")
