# `make demo` compresses the built-in real model on real data; `make test` runs lint and the test suite.
# Both install what they need first (Debian datasets + .venv with CPU torch).
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test lint install

$(STAMP): pyproject.toml constraints.txt scripts/install.sh
	bash scripts/install.sh
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rankcut compress minilm --select fixed:0.9 --out runs/minilm --report runs/minilm-report.json --force

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests scripts

test: lint
	$(VENV)/bin/pytest
