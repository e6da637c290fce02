# Set-up, tests and the default experiment. PYTHON may point at a virtualenv's python.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install test test-slow train figures bench clean-cache

install:  ## torch + torchvision first (pinned pair that imports together), then the package
	$(PIP) install "torch==2.14.1" "torchvision==0.29.1"
	$(PIP) install -e ".[dev]"

test:  ## the default suite (CPU, offline, a few minutes; two workers, one torch thread each)
	$(PYTHON) -m pytest -q -x -n 2 --timeout=900

test-slow:  ## longer checks, marked `slow`
	$(PYTHON) -m pytest -q -m slow --timeout=3600

train:  ## the default experiment: LU on the three-Gaussian mixture
	$(PYTHON) train.py

clean-cache:
	rm -rf outputs/cache

figures:  ## run the GMM sweeps and draw every figure the CPU can make (outputs/figures/)
	$(PYTHON) scripts/make_figures.py

bench:  ## speed and memory per step beside bare diffusers loops (outputs/bench/bench.json; docs/bench.md)
	$(PYTHON) -m unlearn.bench --size cpu
