# The two commands of the README, and test-long (the slow checks). Each sets up .venv first (idempotent, fast when nothing changed).
.PHONY: setup test test-long study

PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest tests

# The long checks: mergekit equality (needs .venv-bench, created here), a kill campaign of many SIGKILLs per
# command, and the bigger fuzz profile.
test-long: setup
	@bash scripts/bench-venv.sh
	VLSAFE_KILLS=6 VLSAFE_KILL_SEEDS=0,1,2,3 VLSAFE_FUZZ=long $(PY) -m pytest tests/test_merge_mergekit.py \
		tests/test_kill.py tests/test_fuzz.py -rs

study: setup
	$(PY) -m vlsafe.cli study
