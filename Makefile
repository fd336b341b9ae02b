# `make demo` runs a whole federation on the embedded default; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= config.yaml
PROFILE ?= profiles/local
LOCK := envs/pip-lock.txt
# Build environments (setuptools for the editable install) follow the lock too.
LOCKED := PIP_CONSTRAINT=$(CURDIR)/$(LOCK)
LOCK_VENV := /tmp/fedhpc-lock-venv
TORCH := 2.13.0
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: demo test lint status clean lock

# Every install takes the versions of $(LOCK), the set CI last passed with, so a fresh clone a
# month from now installs what was tested; `make lock` re-resolves it from pyproject.toml.
$(BIN)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(LOCKED) $(BIN)/pip install --quiet --upgrade pip setuptools
	# The CPU build of torch first, so nothing pulls a multi-GB CUDA build.
	$(LOCKED) $(BIN)/pip install --quiet torch
	$(LOCKED) $(BIN)/pip install --quiet -e '.[test]'
	# DeepSpeed builds against the torch above; isolation would fetch another torch.
	$(LOCKED) $(BIN)/pip install --quiet --no-build-isolation deepspeed
	touch $@

# Re-resolve the lock: the newest releases pyproject.toml admits, installed into a throw-away
# venv exactly as above, then frozen. Run `make test` on the result before committing it.
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet --upgrade pip 'setuptools>=77'
	$(LOCK_VENV)/bin/pip install --quiet torch==$(TORCH)
	$(LOCK_VENV)/bin/pip install --quiet '.[test]'
	$(LOCK_VENV)/bin/pip install --quiet --no-build-isolation "$$(sed -n 's/^deepspeed = \["\(.*\)"\]$$/\1/p' pyproject.toml)"
	{ echo "# pip constraints: the versions \`make test\` last passed with. Regenerate with \`make lock\`."; \
	  echo "# Python $$($(LOCK_VENV)/bin/python -c 'import platform; print(platform.python_version(), platform.machine())')"; \
	  PIP_CONSTRAINT= $(LOCK_VENV)/bin/pip freeze --all --exclude-editable \
	    | grep -v '^fedhpc[= @]' | sed -E 's/^(torch==[^+]*)\+.*/\1/'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf $(LOCK_VENV)

# The Slurm tests start a single-host cluster from Debian's slurm-wlm and munge; the
# multi-site tests an sshd on loopback that rsync logs in to.
.slurm-installed:
	@if command -v slurmctld >/dev/null && command -v munged >/dev/null && command -v rsync >/dev/null \
	  && [ -x /usr/sbin/sshd ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge \
	    openssh-server rsync >/dev/null; \
	else echo "Slurm, sshd or rsync is missing and cannot be installed here: their tests will be skipped (outside CI)"; fi
	@touch $@

# Rerun after any interruption (even kill -9) to resume: fedhpc run clears a stale lock.
demo: $(BIN)/.installed
	$(BIN)/fedhpc run --profile $(PROFILE) --configfile $(CONFIG)

test: $(BIN)/.installed .slurm-installed
	# The package layers (pyproject.toml [tool.importlinter]; docs/architecture.md has the map).
	$(BIN)/lint-imports --no-cache
	# Two workers: most of an end-to-end test is job start-up and polling, not arithmetic. The 20
	# slowest tests are listed, so the suite's cost stays visible in CI logs.
	$(BIN)/pytest -q -n 2 --dist loadgroup --durations=20

lint: $(BIN)/.installed
	$(BIN)/snakemake --lint
	$(BIN)/snakefmt --check workflow rules

clean:
	rm -rf results .snakemake
