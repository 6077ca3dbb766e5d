# Two commands set everything up on a fresh machine:
#   make demo   trains a tokenizer and a small RoBERTa on built-in text and shows what it learned
#   make test   runs the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.c)  # the C extensions are built by the install
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/roberta demo --out demo-out

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q tests

clean:
	rm -rf $(VENV) demo-out
