# make demo   meta-train a ProtoNet on Omniglot (about 2.5 minutes on 2 CPU cores), print 5-way 1-shot test accuracy ± 95% CI
# make demo-maml  the same for second-order MAML (omniglot_5w1s_quick: about 3 minutes, about 93%)
# make test   create .venv, install metalearn with its extras plus learn2learn and higher, run ruff, then pytest
PYTHON ?= python3.11
VENV   ?= .venv
VPY    := $(VENV)/bin/python
PIP    := $(VPY) -m pip install --quiet --disable-pip-version-check
TORCH  := torch==2.14.1
export METALEARN_DATA ?= $(abspath ../shared/data)

.PHONY: install install-dev demo demo-maml test bench clean

$(VPY):
	$(PYTHON) -m venv $(VENV)

# Runtime install: torch pinned (a local file here; an unpinned torch downloads several GB).
$(VENV)/.runtime: $(VPY) setup.cfg pyproject.toml
	$(PIP) $(TORCH)
	$(PIP) -e . $(TORCH)
	touch $@

# Test install: the dev extras and the baselines learn2learn and higher (needed by tests, never at run time).
$(VENV)/.dev: $(VENV)/.runtime .ci/install-baselines.sh
	$(PIP) -e '.[dev]' $(TORCH)
	bash .ci/install-baselines.sh $(VPY)
	touch $@

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

demo: install
	$(VPY) -m metalearn train experiments/configs/protonet_omniglot_demo.yaml

demo-maml: install
	$(VPY) -m metalearn train experiments/configs/omniglot_5w1s_quick.yaml

test: install-dev
	$(VPY) -m ruff check .
	METALEARN_REQUIRE_BASELINES=1 $(VPY) -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
