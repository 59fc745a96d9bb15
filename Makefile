PYTHON ?= python3
STAMP := .make-installed

.PHONY: install test demo lint soak bench dist clean

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

# sdist + wheel in dist/, checked as PyPI would (the sdist carries the tests, see MANIFEST.in)
dist: $(STAMP)
	rm -rf dist
	$(PYTHON) -m build
	$(PYTHON) -m twine check --strict dist/*

clean:
	rm -rf $(STAMP) *.egg-info .pytest_cache ductwork.sqlite3* dist build
