# skyhop: `make test` and `make demo` work on a fresh Debian/Ubuntu with Python 3.11+
# and Mosquitto (apt-get install mosquitto). Both create .venv on first use.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: install test unit demo lint bench clean check-mosquitto

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "skyhop needs Python 3.11 or newer (found $$($(PYTHON) --version))"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	rm -f $(VENV)/.installed-*
	touch $@

check-mosquitto:
	@command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || \
		{ echo "mosquitto not found: install it with 'sudo apt-get install mosquitto'"; exit 1; }

test: install check-mosquitto
	$(PY) -m pytest

unit: install
	$(PY) -m pytest tests/unit

demo: install check-mosquitto
	$(VENV)/bin/skyhop demo --report demo-report.json

lint: install
	$(VENV)/bin/ruff check skyhop edge_agent cloud_broker tests bench models tools

clean:
	rm -rf $(VENV) .pytest_cache
