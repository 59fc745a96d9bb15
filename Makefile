PYTHON ?= python3
STAMP := .make-installed

.PHONY: install test demo lint soak bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m pip install -q -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PYTHON) -m pytest -q -ra

demo: $(STAMP)
	$(PYTHON) examples/demo.py

lint: $(STAMP)
	$(PYTHON) -m ruff check ductwork.py tests examples bench

soak: $(STAMP)
	$(PYTHON) -m pytest -q -ra -m slow -o addopts=''

bench: $(STAMP)
	$(PYTHON) -m pip install -q -e '.[bench]'
	$(PYTHON) bench/run.py

clean:
	rm -rf $(STAMP) *.egg-info .pytest_cache ductwork.sqlite3*
