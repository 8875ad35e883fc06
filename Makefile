# Two commands do all the set-up on a fresh machine:
#   make run   - the bot against a local Synapse it starts itself (prints the demo login)
#   make test  - the whole test suite (unit + integration against a real Synapse)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test bench demo reset clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

run: $(VENV)/.installed
	$(PY) tools/run_local.py

# Two workers, each with its own Synapse: one Synapse and the bot wait on each other, so a
# single session keeps only one of the 2 cores busy.
test: $(VENV)/.installed
	$(PY) -m ruff check . && $(PY) -m ruff format --check . && $(PY) -m mypy
	$(PY) -m pytest -q -n 2

bench: $(VENV)/.installed
	$(PY) tools/bench_heal.py
	$(PY) tools/bench_delivery.py
	$(PY) tools/bench_conversation.py
	$(PY) tools/bench_conversation_cache.py
	$(PY) tools/bench_scale.py
	$(PY) tools/bench_appservice.py
	$(PY) tools/bench_store.py
	$(PY) tools/bench_replicas.py

demo: $(VENV)/.installed
	$(PY) tools/demo.py

reset: $(VENV)/.installed
	LAMBDA_MATRIX_DB=.local/lambda_matrix.db MATRIX_STORE_PATH=.local/matrix_store \
	MATRIX_HOMESERVER=http://127.0.0.1:$${LOCAL_HS_PORT:-8008} MATRIX_USER_ID=@lambda:localhost \
	$(PY) tools/reset_local.py $(ARGS)

clean:
	rm -rf $(VENV) .local .pytest_cache
