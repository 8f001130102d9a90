# Two entry points on a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR := outputs/demo

.PHONY: venv debs demo test lint bench peer-venv clean

# Debian packages: the Aravis fake GigE Vision camera and typelib (a real test peer), the
# headers PyGObject builds against, and PostgreSQL and Mosquitto servers the tests start
# throwaway instances of when none runs on 127.0.0.1:5432/1883 (tests/services.py).
DEB_PACKAGES := aravis-tools gir1.2-aravis-0.8 libgirepository1.0-dev libcairo2-dev \
	postgresql mosquitto

# Checked on every make (dpkg -s is quick), so an existing venv gets packages added here too.
debs:
	dpkg -s $(DEB_PACKAGES) >/dev/null 2>&1 || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		$(DEB_PACKAGES); }

# torch comes first and pinned: pip finds this exact build on the machine's disk.
$(STAMP): pyproject.toml | debs
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/inspectd demo --workdir $(DEMO_DIR)
	$(BIN)/inspectd audit stats -c $(DEMO_DIR)/line/inspectd.yaml --by none

test: venv
	$(BIN)/pytest -q

lint: venv
	$(BIN)/ruff check inspectd tests benchmarks
	$(BIN)/lint-imports --no-cache

bench: venv
	$(BIN)/python benchmarks/run.py --out BENCHMARKS.md

# The peer library for benchmarks/peer.py, never a dependency of inspectd: a copy of the
# project's venv (torch and all, from this machine's disk) with anomalib added.
PEER := .venv-peer
$(PEER)/.installed: $(STAMP)
	rm -rf $(PEER) && cp -a $(VENV) $(PEER)
	$(PEER)/bin/python -m pip install -q anomalib==2.7.0
	touch $@

peer-venv: $(PEER)/.installed

clean:
	rm -rf $(DEMO_DIR)
