# skyhop: `make test` and `make demo` work on a fresh Debian/Ubuntu with Python 3.10+
# and Mosquitto (apt-get install mosquitto). Both create .venv on first use.

PYTHON ?= python3
VENV   ?= .venv
# cpu: onnxruntime; gpu: onnxruntime-gpu with CUDA 13 and cuDNN 9, and NVML (docs/gpu.md).
# The two cannot share a venv: `make test-gpu VENV=.venv-gpu EXTRAS=gpu,dev`. ray: the
# Ray pool backend, which tests/integration/test_ray_pool.py runs on a local cluster; k8s:
# the Kubernetes backend and `skyhop k8s render` (tests/integration/test_k8s_pool.py).
EXTRAS ?= cpu,dev,ray,k8s
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell (cat pyproject.toml; echo $(EXTRAS)) | sha1sum | cut -c1-12)
# JetPack 6's Python: `make test` also runs the unit suite on it (pyenv's, else PATH's; a
# pyenv shim of an inactive version does not run, so each candidate is tried).
PY310   ?= $(shell for p in $$(ls -d $$(pyenv root 2>/dev/null)/versions/3.10*/bin/python3.10 \
	2>/dev/null) $$(command -v python3.10); do $$p -c '' 2>/dev/null && { echo $$p; break; }; done)
VENV310 ?= .venv-py310
STAMP310 := $(VENV310)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: install test test-gpu unit unit-py310 demo lint typecheck bench clean check-mosquitto \
	check-browser

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || \
		{ echo "skyhop needs Python 3.10 or newer (found $$($(PYTHON) --version))"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	rm -f $(VENV)/.installed-*
	touch $@

check-mosquitto:
	@command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || \
		{ echo "mosquitto not found: install it with 'sudo apt-get install mosquitto'"; exit 1; }

# Debian's chromium, for the status page's browser test (tests/integration/test_web.py):
# installed here when run as root (CI); otherwise the test skips and says how.
check-browser:
	@command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
		else echo "chromium not found: the browser test will skip (sudo apt-get install chromium)"; fi

test: install check-mosquitto check-browser typecheck unit-py310
	$(PY) -m pytest

# The unit suite on Python 3.10 (JetPack 6). CI must run it; elsewhere it is skipped,
# saying so, when no python3.10 is found.
unit-py310:
	@if [ -z "$(PY310)" ]; then \
		if [ -n "$$CI" ]; then echo "python3.10 not found: CI runs the unit suite on it"; exit 1; fi; \
		echo "python3.10 not found: skipping the Python 3.10 unit run (pyenv install 3.10)"; \
	else $(MAKE) --no-print-directory $(STAMP310) && $(VENV310)/bin/python -m pytest -q -p no:cacheprovider tests/unit; fi

$(STAMP310): pyproject.toml
	$(PY310) -m venv $(VENV310)
	$(VENV310)/bin/python -m pip install --quiet --upgrade pip
	$(VENV310)/bin/python -m pip install --quiet -e ".[cpu,dev,k8s]"
	rm -f $(VENV310)/.installed-*
	touch $@

# The packages, strict on the pure cores ([tool.mypy] in pyproject.toml); tests are not
# type-checked.
typecheck: install
	$(PY) -m mypy

# On an NVIDIA GPU host: tests/gpu must run there, not skip.
test-gpu: install check-mosquitto
	SKYHOP_REQUIRE_GPU=1 $(PY) -m pytest tests/gpu

unit: install
	$(PY) -m pytest tests/unit

demo: install check-mosquitto
	$(VENV)/bin/skyhop demo --report demo-report.json

lint: install
	$(VENV)/bin/ruff check skyhop edge_agent cloud_broker sim tests bench tools

clean:
	rm -rf $(VENV) $(VENV310) .pytest_cache
