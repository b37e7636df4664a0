# Two entry points: `make search` and `make test`. Both build .venv from nothing when needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: search test test-slow lint clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: this exact version is the CPU build on disk; a bare `torch` pulls CUDA wheels.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

search: $(STAMP)
	$(BIN)/hwnas $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Fault drills (driver SIGKILL + resume, a 2-node Ray cluster, an MLflow server outage): minutes each.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

# mypy cannot follow setuptools' editable import hook (hwnas.search -> search/): it checks a link tree
# laid out as the installed package.
TYPECHECK := build/typecheck
lint: $(STAMP)
	$(BIN)/ruff check hwnas search spaces evaluators agent tests scripts
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/hwnas
	cp hwnas/*.py $(TYPECHECK)/hwnas/
	for d in search spaces evaluators agent; do ln -s "$(CURDIR)/$$d" $(TYPECHECK)/hwnas/$$d; done
	cd $(TYPECHECK) && "$(CURDIR)/$(BIN)/mypy" --config-file "$(CURDIR)/pyproject.toml" -p hwnas.search -p hwnas.spaces

clean-venv:
	rm -rf $(VENV)
