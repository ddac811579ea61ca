# skyhop: `make test` and `make demo` work on a fresh Debian/Ubuntu with Python 3.11+
# and Mosquitto (apt-get install mosquitto). Both create .venv on first use.

PYTHON ?= python3
VENV   ?= .venv
# cpu: onnxruntime; gpu: onnxruntime-gpu with CUDA 13 and cuDNN 9, and NVML (docs/gpu.md).
# The two cannot share a venv: `make test-gpu VENV=.venv-gpu EXTRAS=gpu,dev`.
EXTRAS ?= cpu,dev
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell (cat pyproject.toml; echo $(EXTRAS)) | sha1sum | cut -c1-12)

.PHONY: install test test-gpu unit demo lint typecheck bench clean check-mosquitto

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "skyhop needs Python 3.11 or newer (found $$($(PYTHON) --version))"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	rm -f $(VENV)/.installed-*
	touch $@

check-mosquitto:
	@command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || \
		{ echo "mosquitto not found: install it with 'sudo apt-get install mosquitto'"; exit 1; }

test: install check-mosquitto typecheck
	$(PY) -m pytest

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
	rm -rf $(VENV) .pytest_cache
