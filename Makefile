# Every target creates .venv and installs both distributions editable, the client
# (client/pyproject.toml, `keyguard`) and the server (pyproject.toml, `keyguard-server`,
# with the dev tools), when it is missing or either pyproject.toml changed, so each
# works on a fresh clone. Both in one pip call, so the server's dependency on `keyguard`
# is this repository's client, never a release from the index.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test proto lint clean

$(STAMP): pyproject.toml client/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ./client -e '.[dev]'
	touch $(STAMP)

## run: serve on 127.0.0.1:50051 with SQLite in ./data
run: $(STAMP)
	$(BIN)/keyguard-server serve

## test: the whole test suite
test: $(STAMP)
	$(BIN)/python -m pytest

## proto: regenerate the committed stubs (client/keyguard/v1, server/keyguard_server/envoy) and Envoy's descriptor set from protos/
proto: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python protos/generate.py client server protos/keyguard.binpb

## lint: ruff, mypy, buf lint (protos/keyguard/v1; protos/keyguard_server/envoy follows Envoy's names)
## and buf breaking of keyguard/v1 against the previous commit (skipped, saying so, without one)
# buf reads images protoc builds with the installed google/api protos (buf has no network here).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python protos/generate.py --lint-image $(VENV)/buf-lint.binpb
	cd protos && ../$(BIN)/buf lint ../$(VENV)/buf-lint.binpb --config buf.yaml --path keyguard/v1
	$(BIN)/python protos/breaking.py $(CURDIR)/$(BIN)/buf $(CURDIR)/$(VENV)

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
