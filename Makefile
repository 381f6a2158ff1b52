# bns_pipe: `make install`, `make demo`, `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_CPU := torch==2.13.0

# ogb checks PyPI for a newer version at import; keep runs offline and quiet.
export OUTDATED_IGNORE := 1
# The shared datasets beside the checkout, when present, are the tests' data root.
SHARED_DATA := $(abspath ../shared/datasets)
ifneq ($(wildcard $(SHARED_DATA)),)
export BNS_PIPE_DATA ?= $(SHARED_DATA)
endif

.PHONY: install demo test lint bench accuracy clean

install: .install.stamp

# A torch already importable (e.g. a CUDA build) is kept; otherwise the CPU build is pinned.
.install.stamp: setup.py requirements.txt $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu)
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install $(TORCH_CPU)
	$(PIP) install -r requirements.txt
	$(PIP) install --no-build-isolation -e .
	@$(PYTHON) -c "from bns_pipe import _ext; print('bns_pipe:', _ext.describe())"
	@touch $@

demo: install
	$(PYTHON) -m bns_pipe demo

bench: install
	$(PYTHON) -m bns_pipe bench --out benchmarks/results/bench
	$(PYTHON) -m bns_pipe bench --graphs coauthor-cs --out benchmarks/results/bench-coauthor-cs

accuracy: install
	$(PYTHON) -m bns_pipe accuracy --out benchmarks/results/accuracy
	$(PYTHON) -m bns_pipe accuracy --model gat --out benchmarks/results/accuracy-gat

lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

test: install lint
	$(PYTHON) -m pytest -q tests

clean:
	rm -rf build *.egg-info .install.stamp bns_pipe/_C*.so
