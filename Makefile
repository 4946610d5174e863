# Two entry points for a fresh machine: `make demo` (the demo mesh, as root) and `make test`.
# Both create .venv with the system's python3 (so the sidecar, running as uid 1337, can execute it) and install
# what they need; as root they also install the Debian packages the mesh uses (and `make test` the peers and the
# browser its tests run: stunnel, chromium).

VENV    := .venv
PY      := $(VENV)/bin/python
SYSPY   := $(shell command -v /usr/bin/python3 2>/dev/null || command -v python3)
DEBS    := iptables iproute2 tcpdump openssl curl python3-venv
TEST_DEBS := stunnel4 chromium
STAMP   := $(VENV)/.installed

.PHONY: demo test test-lowest lint typecheck unit debs test-debs clean bench

$(STAMP): pyproject.toml
	$(SYSPY) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

debs:
	@if [ "$$(id -u)" = 0 ] && ! { command -v iptables && command -v ip && command -v tcpdump && command -v curl && $(SYSPY) -c "import ensurepip"; } >/dev/null 2>&1; then \
		apt-get -o DPkg::Lock::Timeout=600 update -qq && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq $(DEBS); \
	fi

test-debs: debs
	@if [ "$$(id -u)" = 0 ] && ! { command -v stunnel4 && command -v chromium; } >/dev/null 2>&1; then \
		apt-get -o DPkg::Lock::Timeout=600 update -qq && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq $(TEST_DEBS); \
	fi

demo: debs $(STAMP)
	$(PY) -m mtlsmesh demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

test: test-debs lint typecheck
	$(PY) -m pytest -q -ra

unit: $(STAMP)
	$(PY) -m pytest -q tests/unit tests/integration

# The unit and integration tests against the lowest pyOpenSSL and cryptography that pyproject.toml allows (CI runs
# this after `make test`), so the bounds there are tested, not hoped.
LOW_VENV := .venv-lowest
LOWEST   := $(shell sed -n 's/^ *"\(pyOpenSSL\|cryptography\)>=\([0-9.]*\)".*/\1==\2/p' pyproject.toml)

test-lowest: test-debs
	$(SYSPY) -m venv $(LOW_VENV)
	$(LOW_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOW_VENV)/bin/python -m pip install --quiet -e '.[test]' $(LOWEST)
	$(LOW_VENV)/bin/python -c "import OpenSSL, cryptography; print('lowest: pyOpenSSL', OpenSSL.__version__, 'cryptography', cryptography.__version__)"
	$(LOW_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/unit tests/integration

bench: debs $(STAMP)
	@if [ "$$(id -u)" = 0 ]; then DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq stunnel4 haproxy iperf3 wrk >/dev/null; fi
	$(PY) -m bench

clean:
	rm -rf $(VENV) $(LOW_VENV) .pytest_cache .mypy_cache .ruff_cache
