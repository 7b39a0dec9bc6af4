# Developer entry points. CI runs `make test`.
PYTHON ?= python
PYTEST_ARGS ?=

.PHONY: crds check-crds test test-operator e2e lint

## Regenerate the DisaggServing CRD (crds/ and the chart's copy) from the API types.
crds:
	$(PYTHON) -m disagg_cli.crds --write

## Fail when the checked-in CRD differs from the generated one.
check-crds:
	$(PYTHON) -m disagg_cli.crds --check

## The whole test suite (unit tests and kmock-backed e2e).
test:
	$(PYTHON) -m pytest $(PYTEST_ARGS)

## Operator unit tests and e2e only.
test-operator:
	$(PYTHON) -m pytest tests/operator e2e $(PYTEST_ARGS)

e2e:
	$(PYTHON) -m pytest e2e $(PYTEST_ARGS)

lint:
	$(PYTHON) -m ruff check .
