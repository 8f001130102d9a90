# Two entry points on a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DATA := data/demo
DEMO_OUT := outputs/demo

.PHONY: venv demo test lint bench clean

# torch comes first and pinned: pip finds this exact build on the machine's disk.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/inspectd data synth $(DEMO_DATA)
	$(BIN)/inspectd fit --data $(DEMO_DATA) --category all --model patchcore --out $(DEMO_OUT)/patchcore
	$(BIN)/inspectd eval --data $(DEMO_DATA) --category all --artifact $(DEMO_OUT)/patchcore --save-pic $(DEMO_OUT)/eval
	$(BIN)/inspectd predict --artifact $(DEMO_OUT)/patchcore/object --save-pic $(DEMO_OUT)/predict $(DEMO_DATA)/object/test/scratch $(DEMO_DATA)/object/test/good

test: venv
	$(BIN)/pytest -q

lint: venv
	$(BIN)/ruff check inspectd tests benchmarks

bench: venv
	$(BIN)/python benchmarks/run.py --out BENCHMARKS.md

clean:
	rm -rf $(DEMO_OUT) $(DEMO_DATA)
