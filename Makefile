# The Makefile only dispatches: every target is one `kdcache VERB key=value ...` call.
# Upper-case variables map to the config keys of the same name (DATASET=digits -> dataset=digits);
# ARGS="key=value ..." passes any other key.
PYTHON ?= python3
VENV   := .venv
KD     := $(VENV)/bin/kdcache
STAMP  := $(VENV)/.installed

kv = $(if $(strip $($(1))),'$(2)=$(strip $($(1)))')
DATA_ARGS  = $(call kv,DATASET,dataset) $(call kv,TEACHER,teacher) $(call kv,TEACHER_CKPT,teacher_ckpt) \
             $(call kv,CACHE,cache) $(call kv,SCHEDULER,scheduler)
STUDENT_ARGS = $(call kv,CACHE,cache) $(call kv,MODEL,model) $(call kv,LOSS,loss) $(call kv,TEMPERATURE,temperature) \
             $(call kv,ALPHA,alpha) $(call kv,EPOCHS,epochs) $(call kv,LR,lr) $(call kv,SEED,seed)

.PHONY: setup teacher teacher-cache info student sweep report verify export test test-fast bench bench-quick soak clean-venv

setup: $(STAMP)
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

teacher: setup
	$(KD) teacher $(DATA_ARGS) $(ARGS)

teacher-cache: setup
	$(KD) cache $(DATA_ARGS) $(call kv,LOGITS,logits) $(ARGS)

info: setup
	$(KD) info $(call kv,CACHE,cache) $(ARGS)

student: setup
	$(KD) student $(STUDENT_ARGS) $(ARGS)

sweep: setup
	$(KD) sweep $(call kv,CACHE,cache) $(call kv,MODELS,models) $(call kv,LOSSES,losses) \
	  $(call kv,SEEDS,seeds) $(call kv,TEMPERATURES,temperatures) $(call kv,SCHEDULER,scheduler) $(ARGS)

report: setup
	$(KD) report $(call kv,CACHE,cache) $(ARGS)

verify: setup
	$(KD) verify $(call kv,CACHE,cache) $(ARGS)

export: setup
	$(KD) export $(call kv,RUN,run) $(call kv,FORMAT,format) $(ARGS)

test: setup
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(VENV)/bin/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/pip install --quiet -e '.[test,bench]'
	$(VENV)/bin/python -m bench.run $(BENCH_ARGS)

bench-quick: setup
	$(VENV)/bin/pip install --quiet -e '.[test,bench]'
	$(VENV)/bin/python -m bench.run --quick $(BENCH_ARGS)

# The fault tests with the full 20 seeded kill trials (make test runs 3).
soak: setup
	KDCACHE_KILL_TRIALS=20 $(VENV)/bin/python -m pytest -q tests/test_faults.py $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
