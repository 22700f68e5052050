# `make demo` compresses a built-in trained model on real data, its ranks chosen with its loss; `make test`
# runs lint and the test suite;
# `make bench` runs the default benchmark sweep (ResNet-20 and MiniLM, two budgets, every method) into
# runs/bench/, every selector at its defaults: about 21 minutes on 2 cores (benchmarks/PREAMBLE.md has the last
# timing). All install what they need first (Debian datasets + .venv).
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test lint install bench

BENCH_MODELS ?= resnet20 minilm
BENCH_BUDGETS ?= 0.7,0.4
BENCH_OUT ?= runs/bench

$(STAMP): pyproject.toml constraints.txt scripts/install.sh
	bash scripts/install.sh
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rankcut compress vgg --task fashion-mnist --select lossless --target params=0.3 \
		--out runs/vgg --report runs/vgg-report.json --force

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests scripts benchmarks

test: lint
	$(VENV)/bin/pytest

bench: $(STAMP)
	mkdir -p $(BENCH_OUT)
	for model in $(BENCH_MODELS); do \
		$(VENV)/bin/python benchmarks/sweep.py $$model --budgets $(BENCH_BUDGETS) \
			--out $(BENCH_OUT)/$$model.json || exit 1; \
	done
	$(VENV)/bin/python benchmarks/report.py $(BENCH_OUT)/*.json --out $(BENCH_OUT)/RESULTS.md
