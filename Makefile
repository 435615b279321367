# Every target creates .venv and installs the project (with its dev tools) when
# it is missing or pyproject.toml changed, so each works on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test proto lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## run: serve on 127.0.0.1:50051 with SQLite in ./data
run: $(STAMP)
	$(BIN)/keyguard serve

## test: the whole test suite
test: $(STAMP)
	$(BIN)/python -m pytest

## proto: regenerate the committed stubs in client/keyguard/ and Envoy's descriptor set from protos/
proto: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python protos/generate.py client protos/keyguard.binpb

## lint: ruff, mypy and buf lint (protos/keyguard/v1; protos/keyguard/envoy follows Envoy's names)
# buf lints an image protoc builds with the installed google/api protos (buf has no network here).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python protos/generate.py --lint-image $(VENV)/buf-lint.binpb
	cd protos && ../$(BIN)/buf lint ../$(VENV)/buf-lint.binpb --config buf.yaml --path keyguard/v1

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
