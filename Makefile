# `make demo` runs a whole federation on the embedded default; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= config.yaml
PROFILE ?= profiles/local
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: demo test lint status clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch first, so nothing pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	# DeepSpeed builds against the torch above; isolation would fetch another torch.
	$(BIN)/pip install --quiet --no-build-isolation 'deepspeed>=0.15'
	touch $@

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
	# Two workers: most of an end-to-end test is job start-up and polling, not arithmetic.
	$(BIN)/pytest -q -n 2 --dist loadgroup

lint: $(BIN)/.installed
	$(BIN)/snakemake --lint
	$(BIN)/snakefmt --check workflow rules

clean:
	rm -rf results .snakemake
