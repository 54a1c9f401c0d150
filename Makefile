# SendSystem: `make test` and `make demo` do the whole set-up themselves:
# a virtual environment, the package with its test extras, a MariaDB that
# answers (started, or installed from the distribution's packages when
# missing) and, for the tests that need a C-speed or real MTA peer, Postfix.
#
# Tests come in three tiers (tests/unit, tests/integration, tests/cluster).
# `make unit` is the inner loop: the venv and the pure tests only, no MariaDB
# or Postfix set-up, in seconds. `make test` runs ruff, then the tiers fastest
# first, so a broken pure function fails the run before any server starts.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
APT     = DEBIAN_FRONTEND=noninteractive apt-get -y -q -o Dpkg::Use-Pty=0
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: test unit integration cluster demo venv mariadb postfix galera lint bench clean

test: venv mariadb postfix galera
	$(BIN)/ruff check sendsystem tests bench
	$(BIN)/mypy
	$(BIN)/pytest -q tests/unit
	$(BIN)/pytest -q tests/integration
	$(BIN)/pytest -q tests/cluster

unit: venv
	$(BIN)/pytest -q tests/unit

integration: venv mariadb postfix
	$(BIN)/pytest -q tests/integration

cluster: venv mariadb galera
	$(BIN)/pytest -q tests/cluster

demo: venv mariadb
	$(BIN)/sendsystem demo

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# MariaDB on 127.0.0.1:3306 (root, empty password, as Debian sets it up for
# root over the socket; the tests use TCP as root).
mariadb:
	@if ! command -v mariadbd >/dev/null 2>&1 && [ ! -x /usr/sbin/mariadbd ]; then \
		echo "Installing MariaDB from the distribution's packages"; \
		$(SUDO) apt-get update -q && $(SUDO) $(APT) install mariadb-server; \
	fi
	@if ! $(BIN)/python -c "import pymysql; pymysql.connect(host='127.0.0.1', user='root', password='')" 2>/dev/null; then \
		echo "Starting MariaDB"; \
		$(SUDO) mkdir -p /run/mysqld && $(SUDO) chown mysql:mysql /run/mysqld 2>/dev/null || true; \
		$(SUDO) start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd; \
		for i in $$(seq 1 60); do \
			$(BIN)/python -c "import pymysql; pymysql.connect(host='127.0.0.1', user='root', password='')" 2>/dev/null && break; \
			sleep 1; \
		done; \
	fi
	@$(BIN)/python -c "import pymysql; pymysql.connect(host='127.0.0.1', user='root', password='')" \
		|| { echo "MariaDB does not answer on 127.0.0.1:3306 as root"; exit 1; }

# Postfix gives the tests genuine DSNs and benchmarks a C-speed SMTP sink
# (smtp-sink). "No configuration": we never run it as the system's MTA.
postfix:
	@if [ ! -x /usr/sbin/smtp-sink ]; then \
		echo "Installing Postfix (for smtp-sink and real bounces)"; \
		echo "postfix postfix/main_mailer_type select No configuration" | $(SUDO) debconf-set-selections; \
		$(SUDO) apt-get update -q && $(SUDO) $(APT) install postfix; \
	fi

# tests/cluster/test_galera.py runs a private 3-node Galera cluster on loopback:
# Debian's galera-4 provider, rsync for its state transfer, and ss (iproute2),
# which the rsync transfer script uses to find its daemon's port.
galera:
	@if [ ! -e /usr/lib/galera/libgalera_smm.so ] || ! command -v rsync >/dev/null 2>&1 \
			|| ! command -v ss >/dev/null 2>&1; then \
		echo "Installing galera-4, rsync and iproute2 (for the Galera cluster test)"; \
		$(SUDO) apt-get update -q && $(SUDO) $(APT) install galera-4 rsync iproute2; \
	fi

lint: venv
	$(BIN)/ruff check sendsystem tests bench
	$(BIN)/mypy

bench: venv mariadb postfix
	$(BIN)/python bench/pipeline.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
