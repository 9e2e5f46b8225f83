# The two commands of the README, and test-long (the slow checks). Each sets up .venv first (idempotent, fast when nothing changed).
.PHONY: setup test test-long study

PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

setup:
	@bash scripts/setup.sh

# two pytest-xdist workers, each on its share of the cores; one file runs on one worker (a module's fixtures, such
# as test_study.py's pico study run, are made once)
test: setup
	$(PY) -m pytest tests -n 2 --dist loadfile

# The long checks: mergekit equality (needs .venv-bench, created here), a kill campaign of many SIGKILLs per
# command, and the bigger fuzz profile.
test-long: setup
	@bash scripts/bench-venv.sh
	VLSAFE_KILLS=6 VLSAFE_KILL_SEEDS=0,1,2,3 VLSAFE_FUZZ=long $(PY) -m pytest tests/test_merge_mergekit.py \
		tests/test_kill.py tests/test_fuzz.py -rs \
		"tests/test_study.py::test_a_killed_study_finishes_with_the_results_of_an_uninterrupted_run"

study: setup
	$(PY) -m vlsafe.cli study
