# The Makefile only dispatches: every target is one `kdcache VERB key=value ...` call.
# Upper-case variables map to the config keys of the same name (DATASET=digits -> dataset=digits);
# ARGS="key=value ..." passes any other key.
PYTHON ?= python3

# The variables each target takes. One given on the command line that none of the goals takes is
# refused before anything runs (even under make -n), not ignored: `make student MODLE=cnn_small`
# would train the default model. Variables from the environment or make itself do not count.
TAKES.setup         := PYTHON
TAKES.teacher       := DATASET TEACHER
TAKES.teacher-cache := DATASET TEACHER TEACHER_CKPT CACHE SCHEDULER LOGITS
TAKES.info          := CACHE
TAKES.student       := CACHE MODEL LOSS TEMPERATURE ALPHA EPOCHS LR SEED
TAKES.sweep         := CACHE MODELS LOSSES SEEDS TEMPERATURES SCHEDULER
TAKES.report        := CACHE
TAKES.verify        := CACHE
TAKES.export        := RUN FORMAT
TAKES.test          := PYTEST_ARGS
TAKES.test-fast     := PYTEST_ARGS
TAKES.soak          := PYTEST_ARGS
TAKES.bench         := BENCH_ARGS
TAKES.bench-quick   := BENCH_ARGS
VERB_TARGETS := teacher teacher-cache info student sweep report verify export
GOALS   := $(or $(MAKECMDGOALS),setup)
TAKEN   := PYTHON MAKEFLAGS MFLAGS GNUMAKEFLAGS SHELL $(foreach g,$(GOALS),$(TAKES.$(g))) $(if $(filter $(VERB_TARGETS),$(GOALS)),ARGS)
UNKNOWN := $(filter-out $(TAKEN),$(foreach v,$(.VARIABLES),$(if $(filter command line,$(origin $(v))),$(v))))
ifneq ($(UNKNOWN),)
$(error unknown variable $(firstword $(UNKNOWN)) for `make $(GOALS)`; it takes \
  $(or $(strip $(foreach g,$(GOALS),$(TAKES.$(g)))),no variables)$(if $(filter $(VERB_TARGETS),$(GOALS)), and ARGS='key=value ...'))
endif
VENV   := .venv
KD     := $(VENV)/bin/kdcache
STAMP  := $(VENV)/.installed

kv = $(if $(strip $($(1))),'$(2)=$(strip $($(1)))')
TEACHER_ARGS = $(call kv,DATASET,dataset) $(call kv,TEACHER,teacher)
DATA_ARGS  = $(TEACHER_ARGS) $(call kv,TEACHER_CKPT,teacher_ckpt) $(call kv,CACHE,cache) $(call kv,SCHEDULER,scheduler)
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
	$(KD) teacher $(TEACHER_ARGS) $(ARGS)

teacher-cache: setup
	$(KD) cache $(DATA_ARGS) $(call kv,LOGITS,logits) $(ARGS)

info: setup
	$(KD) info $(call kv,CACHE,cache) $(ARGS)

student: setup
	$(KD) student $(STUDENT_ARGS) $(ARGS)

sweep: setup
	$(KD) sweep $(call kv,CACHE,cache) $(call kv,MODELS,grid.model) $(call kv,LOSSES,grid.loss) \
	  $(call kv,SEEDS,grid.seed) $(call kv,TEMPERATURES,grid.temperature) $(call kv,SCHEDULER,scheduler) $(ARGS)

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

# The fault tests with the full 20 seeded kill trials (make test runs 1), the multi-view kills
# and the twice-killed build on S3.
soak: setup
	KDCACHE_KILL_TRIALS=20 $(VENV)/bin/python -m pytest -q tests/test_faults.py \
	  tests/test_object_storage.py::test_sigkill_mid_build_on_s3_then_resume_is_byte_identical $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
