# Two commands on a fresh machine: `make demo` and `make test`. Each makes .venv itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Two stamps: the demo needs only the program; the tests and lint also pytest, ruff, mypy.
RUN_STAMP := $(VENV)/.installed-run
STAMP := $(VENV)/.installed

.PHONY: demo test unit check lint clean bench soak man

$(RUN_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $(RUN_STAMP)

$(STAMP): $(RUN_STAMP)
	$(BIN)/pip install --quiet -e '.[test,dev]'
	touch $(STAMP)

# Per-user mode in a temporary directory, also as root: never the system's paths.
demo: $(RUN_STAMP)
	$(BIN)/mailoauthd demo

# Regenerates the man pages and shell completions in share/ from the argument parsers
# and the config key table; tests/test_manpages.py fails when they are out of date.
man: $(RUN_STAMP)
	$(BIN)/python -m mailoauthd.manpages share

# Everything: the unit tests and the integration tests, which start the real programs
# (tests/conftest.py says which are which; docs/architecture.md, "Test levels").
test: $(STAMP)
	$(BIN)/python -m pytest -W error -q

# The unit level alone: no program started, the quick loop while editing. Spread over
# every core (pytest-xdist): these tests share nothing but ephemeral ports and tmp_path;
# each worker collects the suite again, so it helps when the cores are otherwise idle.
unit: $(STAMP)
	$(BIN)/python -m pytest -W error -q -m "not integration" -n auto

lint: $(STAMP)
	$(BIN)/ruff format --check mailoauthd tests bench
	$(BIN)/ruff check mailoauthd tests bench
	$(BIN)/mypy --strict mailoauthd

check: lint test

# The benchmarks: writes docs/performance.md in about 8 minutes. Installs what it
# needs (Debian's mutt, gnupg, gcc; a non-editable install in bench/.venv).
bench:
	bash bench/setup.sh
	bench/.venv/bin/python bench/run.py

# The reliability suite at full size (2,000 kill cycles, 30 s of load, ...): about 15
# minutes; writes docs/reliability.md from what it counted. `make test` runs it smaller.
soak: $(STAMP)
	MAILOAUTHD_SOAK=1 MAILOAUTHD_RELIABILITY_REPORT=docs/reliability.md \
		$(BIN)/python -m pytest -W error -q tests/reliability
	MAILOAUTHD_SOAK=1 $(BIN)/python -m pytest -W error -q tests/fleet/test_fleet_chaos.py

clean:
	rm -rf $(VENV) bench/.venv build *.egg-info .pytest_cache .mypy_cache .ruff_cache
