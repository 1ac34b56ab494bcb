# Every target does its own set-up: a fresh clone needs nothing but python3.11 and the network.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat setup.py | md5sum | cut -c1-8)

.PHONY: venv data test test-fast parity wheel-check demo bench clean

venv: $(STAMP)

$(STAMP): setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[torch,mindspore,onnx,plots,openvino,serve,serve-test,ray,dev]"
	@rm -f $(VENV)/.installed-*
	@touch $@

## Fashion-MNIST's IDX files (Debian's dataset-fashion-mnist) for the tests and `dvt evaluate`; needs root.
data:
	@test -d /usr/share/datasets/fashion-mnist || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }

## The whole suite: unit tests, conformance with the official release, the cross-backend parity suite and
## the wheel check; -ra lists every skip with its reason (with CI=true a skipped data-set test fails).
test: venv
	$(PY) -m pytest -q -ra tests

## Everything but the slow tests.
test-fast: venv
	$(PY) -m pytest -q -ra -m "not slow" tests

## Build the wheel, install it into a scratch folder and run `dvt demo` and build(weights="default") from outside the checkout.
wheel-check: venv
	$(PY) -m pytest -q -ra -m wheel tests

## Only the cross-backend parity suite.
parity: venv
	$(PY) -m pytest -q -m parity tests

## The shipped Fashion-MNIST DVT on sample images.
demo: venv
	$(VENV)/bin/dvt demo --force   # replaces its own dvt_demo.png from an earlier run

## Speed figures (ratios measured within one run): early exit vs static, the policy sweep, MindSpore vs torch; each runtime and precision against its own static model.
bench: venv
	$(PY) -m dvt_core benchmark dvt_t2t_vit_12 --batch-sizes 1 64 --threads 1 --repeats 3
	$(PY) benchmarks/bench_policy.py
	$(PY) benchmarks/bench_mindspore.py
	$(PY) -m dvt_core benchmark dvt_deit_small --backend torch onnx --batch-sizes 1 64 --threads 1 --repeats 3
	$(PY) -m dvt_core benchmark dvt_fashion_mnist --weights default --backend torch onnx --precision fp32 bf16 --batch-sizes 1 64 --images 128 --threads 1 --modes adaptive stages streaming

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
