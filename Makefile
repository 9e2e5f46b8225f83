# The two commands of the README. Both set up .venv first (idempotent, fast when nothing changed).
.PHONY: setup test study

PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest tests

study: setup
	$(PY) -m vlsafe.cli study
