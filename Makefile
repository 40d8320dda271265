# Everything the tests, the demo and the benchmark need is installed from here, on a fresh
# Debian machine: the real Gearman peers and job servers (the C gearmand, /usr/sbin/gearmand,
# and gearman-server's Perl Gearman::Server, /usr/bin/gearmand), Prometheus (server and
# promtool, for the alert rule tests and the live dashboard test), systemd (systemd-analyze,
# to verify the unit), iproute2 (ip and tc, for the network partition test, which also
# needs root) and haproxy (the TLS terminator of the TLS tests, and the benchmark's baseline)
# from Debian's packages, a C compiler and the Python headers (gcc, python3-dev: the compiled
# fast path, gproxy/_dataplane.pyx, is built into the venv), and a venv with the project.

PYTHON ?= python3
VENV := .venv
APT_PACKAGES := gearman-job-server gearman-server gearman-tools libgearman-client-perl libio-socket-ssl-perl php-cli php-gearman php-mysql php-sqlite3 prometheus systemd iproute2 haproxy gcc python3-dev
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: test test-pure demo bench chaos fuzz system-deps apt-install clean

# The whole suite on the compiled data plane, then the data plane's own tests and a few
# end-to-end ones on the pure-Python one (GPROXY_NO_EXTENSIONS=1): both paths, every run.
PURE_TESTS := tests/test_fast_path.py tests/test_gate.py tests/test_dataplane.py tests/test_tls_endpoint.py tests/test_proxy_bad_input.py \
	tests/test_tls_real_peers.py tests/test_proxy_real_peers.py tests/test_supervision.py

test: system-deps $(VENV)/.installed
	$(VENV)/bin/ruff check gproxy
	$(VENV)/bin/mypy
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)
	GPROXY_NO_EXTENSIONS=1 $(VENV)/bin/python -m pytest -q $(PURE_TESTS)

# The whole suite on the pure-Python data plane, beside `make test`'s part of it.
test-pure: system-deps $(VENV)/.installed
	GPROXY_NO_EXTENSIONS=1 $(VENV)/bin/python -m pytest $(PYTEST_ARGS)

demo: system-deps $(VENV)/.installed
	$(VENV)/bin/python examples/demo.py

bench: system-deps $(VENV)/.installed
	$(VENV)/bin/python bench/run.py $(BENCH_ARGS)

# The chaos tier's long run (tests/chaos): `make chaos SECONDS=600 SEED=1`
# (CHAOS_ARGS=--keep keeps the run's logs and records even if it passes).
chaos: system-deps $(VENV)/.installed
	$(VENV)/bin/python -m tests.chaos --seconds $(or $(SECONDS),600) --seed $(or $(SEED),1) $(CHAOS_ARGS)

# The fuzz tier's long run (tests/fuzz): `make fuzz SECONDS=600 SEED=1`.
fuzz: system-deps $(VENV)/.installed
	$(VENV)/bin/python -m tests.fuzz --seconds $(or $(SECONDS),600) --seed $(or $(SEED),1) $(FUZZ_ARGS)

system-deps:
	@$(MAKE) --no-print-directory apt-install PACKAGES="$(APT_PACKAGES)"

# Installs only what is missing, so a prepared machine pays nothing.
apt-install:
	@missing=""; \
	for p in $(PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(VENV)/.installed: pyproject.toml setup.py gproxy/_dataplane.pyx
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info gproxy/_dataplane.c gproxy/*.so
