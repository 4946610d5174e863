# Two entry points for a fresh machine: `make demo` (the demo mesh, as root) and `make test`.
# Both create .venv with the system's python3 (so the sidecar, running as uid 1337, can execute it) and install
# what they need; as root they also install the Debian packages the mesh uses.

VENV    := .venv
PY      := $(VENV)/bin/python
SYSPY   := $(shell command -v /usr/bin/python3 2>/dev/null || command -v python3)
DEBS    := iptables iproute2 tcpdump openssl python3-venv
STAMP   := $(VENV)/.installed

.PHONY: demo test lint typecheck unit debs clean bench

$(STAMP): pyproject.toml
	$(SYSPY) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

debs:
	@if [ "$$(id -u)" = 0 ] && ! { command -v iptables && command -v ip && command -v tcpdump && $(SYSPY) -c "import ensurepip"; } >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEBS); \
	fi

demo: debs $(STAMP)
	$(PY) -m mtlsmesh demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

test: debs lint typecheck
	$(PY) -m pytest -q -ra

unit: $(STAMP)
	$(PY) -m pytest -q tests/unit tests/integration

bench: debs $(STAMP)
	@if [ "$$(id -u)" = 0 ]; then DEBIAN_FRONTEND=noninteractive apt-get install -y -qq stunnel4 iperf3 wrk >/dev/null; fi
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
