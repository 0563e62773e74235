# Everything a fresh machine needs. torch is pinned to the CPU build that lies on this machine;
# an unpinned torch would pull gigabytes of CUDA packages.
PYTHON ?= python3
PIP = $(PYTHON) -m pip
DEMO_DATA = data/demo
DEMO_RUN = runs/demo
DEMO_STEPS ?= 1200
DEMO_PORT ?= 29500   # the rendezvous port: two jobs on one port would join each other's rendezvous
DEEPSPEED = deepspeed --num_gpus 2 --master_port $(DEMO_PORT)
DEMO_STAGE2_STEPS ?= 600
# Stage two on the demo: the toy model's lengths are drawn from smaller ranges than PLUG's [32, 512].
PALM_DEMO = stage=palm model=toy data.dir=$(DEMO_DATA)/prepared 'stage.src_len=[32,96]' 'stage.tgt_len=[32,64]' \
	train.max_steps=$(DEMO_STAGE2_STEPS) train.lr=1e-3 train.log_every=20 train.eval_every=200 train.save_every=300

# Fine-tuning on the demo's own tasks (data/make_demo_tasks.py): NER and title generation, each also from random init.
FT_RUN ?= $(DEMO_RUN)/finetune
FT_STEPS ?= 400
FT_SEED ?= 1234   # the fine-tuning seed (the head's init, the data order, dropout): another seed, another FT_RUN
FINETUNE = $(DEEPSPEED) --module pretrain.finetune model=toy logger.progress=false logger.wandb.mode=disabled \
	seed=$(FT_SEED) train.max_steps=$(FT_STEPS) train.lr=5e-4 train.eval_every=100 train.log_every=50
RANDOM_INIT = init_from=null vocab=$(DEMO_RUN)/structbert/vocab.txt
NER = task=ner data.dir=$(DEMO_DATA)/tasks/ner
TITLE = task=generation data.dir=$(DEMO_DATA)/tasks/title

STUDY_RUN ?= $(DEMO_RUN)/finetune_study
MENTIONS = task=classification data.dir=$(DEMO_DATA)/tasks/mentions
SENTIMENT = task=classification data.dir=$(DEMO_DATA)/tasks/sentiment task.max_len=64

LONGER_RUN = $(DEMO_RUN)/structbert_x2

.PHONY: install install-test demo finetune-demo finetune-study finetune-longer compare test clean-demo bench-speed \
	gpu-wheels gpu-check-dry-run test-fast lint-imports

# pip runs again only when setup.py or this file changed since it last ran for this interpreter (half a minute of
# resolving otherwise, at every make test-fast); `rm -r .make` forces it.
STAMP = .make/$(shell $(PYTHON) -c 'import hashlib, sys; print(hashlib.sha1(sys.prefix.encode()).hexdigest()[:12])')
install: $(STAMP)/install
$(STAMP)/install: setup.py Makefile
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[hf]"
	@mkdir -p $(@D) && touch $@

# The Slurm tests start a throwaway cluster (tests/slurm_cluster.py): Debian's slurm-wlm and munge, installed here
# when missing and possible (root with apt-get); otherwise those tests skip, and the install still succeeds.
install-test: $(STAMP)/install-test
	@if ! command -v slurmctld >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null) \
				|| echo "install-test: could not install slurm-wlm and munge; the Slurm tests will skip"; \
		else \
			echo "install-test: slurmctld not found (needs root and apt-get to install); the Slurm tests will skip"; \
		fi; \
	fi

$(STAMP)/install-test: $(STAMP)/install
	$(PIP) install -q -e ".[test]"
	@touch $@

demo: install
	$(PYTHON) data/fetch_demo.py --out $(DEMO_DATA)/raw
	[ -f $(DEMO_DATA)/prepared/meta.json ] || $(PYTHON) -m pretrain.prepare input=$(DEMO_DATA)/raw out=$(DEMO_DATA)/prepared workers=2
	$(DEEPSPEED) --module pretrain.train stage=structbert model=toy \
		data.dir=$(DEMO_DATA)/prepared run.dir=$(DEMO_RUN)/structbert train.max_steps=$(DEMO_STEPS) \
		stage.seq_len=64 train.lr=1e-3 train.log_every=20 train.eval_every=200 train.save_every=600
	$(DEEPSPEED) --module pretrain.train $(PALM_DEMO) run.dir=$(DEMO_RUN)/palm init_from=$(DEMO_RUN)/structbert
	$(PYTHON) data/held_out_prompts.py --prepared $(DEMO_DATA)/prepared --count 4 --out $(DEMO_RUN)/prompts.txt
	$(PYTHON) -m pretrain.generate run.dir=$(DEMO_RUN)/palm prompts_file=$(DEMO_RUN)/prompts.txt \
		max_new_tokens=40 strategy=sample top_p=0.9 temperature=0.8 seed=0 echo=true
	$(PYTHON) -m pretrain.summary run.dir=$(DEMO_RUN)/structbert run.dir=$(DEMO_RUN)/palm
	$(PYTHON) -m pretrain.export run.dir=$(DEMO_RUN)/structbert out=$(DEMO_RUN)/hf/structbert overwrite=true
	$(PYTHON) -m pretrain.export run.dir=$(DEMO_RUN)/palm out=$(DEMO_RUN)/hf/palm overwrite=true
	$(PYTHON) experiments/hf_continue.py --run $(DEMO_RUN)/palm --export $(DEMO_RUN)/hf/palm --prompts $(DEMO_RUN)/prompts.txt \
		--no-repeat-ngram-size 3

# After `make demo`: NER from stage one (its last checkpoint and the one halfway) and titles from stage two, each
# against random init of the same shapes; then the table of test figures.
finetune-demo: install
	$(PYTHON) data/fetch_demo.py --out $(DEMO_DATA)/raw
	$(PYTHON) data/make_demo_tasks.py --prepared $(DEMO_DATA)/prepared --out $(DEMO_DATA)/tasks
	$(FINETUNE) $(NER) init_from=$(DEMO_RUN)/structbert run.dir=$(FT_RUN)/ner/pretrained
	$(FINETUNE) $(NER) init_from=$(DEMO_RUN)/structbert/checkpoints/step$$(($(DEMO_STEPS) / 2)) run.dir=$(FT_RUN)/ner/pretrained_half
	$(FINETUNE) $(NER) $(RANDOM_INIT) run.dir=$(FT_RUN)/ner/random
	$(FINETUNE) $(TITLE) init_from=$(DEMO_RUN)/palm run.dir=$(FT_RUN)/title/pretrained
	$(FINETUNE) $(TITLE) $(RANDOM_INIT) run.dir=$(FT_RUN)/title/random
	$(PYTHON) experiments/finetune_table.py --root $(FT_RUN)

# After `make demo`: does longer pre-training, or the pre-trained pooler, help a classifier on the pooled [CLS]?
# Sentence classification (which kinds of name a sentence holds) from stage one at half and all of its steps, with
# its sentence head's pooler or a fresh one, against random init; and review sentiment (text pre-training never saw).
finetune-study: install
	$(PYTHON) data/fetch_demo.py --out $(DEMO_DATA)/raw
	$(PYTHON) data/make_demo_tasks.py --prepared $(DEMO_DATA)/prepared --out $(DEMO_DATA)/tasks
	$(FINETUNE) $(MENTIONS) init_from=$(DEMO_RUN)/structbert run.dir=$(STUDY_RUN)/mentions/pretrained
	$(FINETUNE) $(MENTIONS) init_from=$(DEMO_RUN)/structbert task.pretrained_pooler=false run.dir=$(STUDY_RUN)/mentions/pretrained_fresh_pooler
	$(FINETUNE) $(MENTIONS) init_from=$(DEMO_RUN)/structbert/checkpoints/step$$(($(DEMO_STEPS) / 2)) run.dir=$(STUDY_RUN)/mentions/pretrained_half
	$(FINETUNE) $(MENTIONS) init_from=$(DEMO_RUN)/structbert/checkpoints/step$$(($(DEMO_STEPS) / 2)) task.pretrained_pooler=false \
		run.dir=$(STUDY_RUN)/mentions/pretrained_half_fresh_pooler
	$(FINETUNE) $(MENTIONS) $(RANDOM_INIT) run.dir=$(STUDY_RUN)/mentions/random
	$(FINETUNE) $(SENTIMENT) init_from=$(DEMO_RUN)/structbert run.dir=$(STUDY_RUN)/sentiment/pretrained
	$(FINETUNE) $(SENTIMENT) init_from=$(DEMO_RUN)/structbert/checkpoints/step$$(($(DEMO_STEPS) / 2)) run.dir=$(STUDY_RUN)/sentiment/pretrained_half
	$(FINETUNE) $(SENTIMENT) $(RANDOM_INIT) run.dir=$(STUDY_RUN)/sentiment/random
	$(PYTHON) experiments/finetune_table.py --root $(STUDY_RUN)

# After `make finetune-demo` and `make finetune-study`: stage one trained twice as long (its schedule spanning
# 2 x DEMO_STEPS), then the same NER and mentions fine-tunes from it: does longer pre-training hurt transfer?
finetune-longer: install
	$(DEEPSPEED) --module pretrain.train stage=structbert model=toy logger.progress=false \
		data.dir=$(DEMO_DATA)/prepared run.dir=$(LONGER_RUN) train.max_steps=$$(($(DEMO_STEPS) * 2)) \
		stage.seq_len=64 train.lr=1e-3 train.log_every=20 train.eval_every=400 train.save_every=1200
	$(FINETUNE) $(NER) init_from=$(LONGER_RUN) run.dir=$(FT_RUN)/ner/pretrained_x2
	$(FINETUNE) $(MENTIONS) init_from=$(LONGER_RUN) run.dir=$(STUDY_RUN)/mentions/pretrained_x2
	$(FINETUNE) $(MENTIONS) init_from=$(LONGER_RUN) task.pretrained_pooler=false run.dir=$(STUDY_RUN)/mentions/pretrained_x2_fresh_pooler
	$(FINETUNE) $(SENTIMENT) init_from=$(LONGER_RUN) run.dir=$(STUDY_RUN)/sentiment/pretrained_x2
	$(PYTHON) experiments/finetune_table.py --root $(FT_RUN)
	$(PYTHON) experiments/finetune_table.py --root $(STUDY_RUN)

# Stage two from the demo's stage one against stage two from random weights (run `make demo` first).
compare: install
	$(PYTHON) experiments/compare_init.py --stage-one $(DEMO_RUN)/structbert --out $(DEMO_RUN)/compare --master-port $(DEMO_PORT) -- \
		$(PALM_DEMO) logger.progress=false

# Two pytest-xdist workers (the runs are mostly process start-up, which leaves a core idle), each process with one
# intra-op thread (two workers of two threads each on two cores thrash: 81 s of test-fast against 63 s).
# make test hands out whole files (--dist loadfile), so that a module's runs are made once.
# PYTEST_WORKERS=0 runs the suite in one process.
# The tests write bytecode (Python's default) also where PYTHONDONTWRITEBYTECODE is set, as on these machines: else
# every process compiles the package again (about 0.4 s of each rank's start) and pytest rewrites every test module
# in each worker (2 s of its collection). The files go to __pycache__ folders, which git ignores.
PYTEST_WORKERS ?= 2
PYTEST = PYTHONDONTWRITEBYTECODE= OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PYTHON) -m pytest -q -n $(PYTEST_WORKERS)
test: install-test lint-imports
	$(PYTEST) --dist loadfile tests $(PYTEST_ARGS)

# The package's layers (pyproject.toml, [tool.importlinter]): an import that runs upward fails here, with the line
# that makes it. About 2 s.
lint-imports: install-test
	$(PYTHON) -c 'from importlinter.cli import lint_imports_command; lint_imports_command()' --no-cache

# Before each commit: the tests that start no process (no launcher, no CLI, no Slurm, no GPU), about 50 s on 2
# cores: every objective, both models, the data pipeline, the checkpoint vetting. The markers: pyproject.toml.
test-fast: install-test lint-imports
	$(PYTEST) -m "not e2e and not slurm and not gpu" tests $(PYTEST_ARGS)

clean-demo:
	rm -rf $(DEMO_RUN)

# After `make demo` (its prepared corpus): tokens/s against transformers' BERT and BART side by side, the data
# loader against a step, ZeRO-3's overhead; see bench/speed.py (about 12 minutes here).
bench-speed: install
	$(PYTHON) bench/speed.py --data $(DEMO_DATA)/prepared

# Throughput and peak memory of pretrain.prepare, 1 worker against 2, on a generated corpus of BENCH_GB gigabytes
# (deleted afterwards); see bench/prepare_scale.py.
BENCH_GB ?= 2
.PHONY: bench-prepare
bench-prepare:
	$(PYTHON) bench/prepare_scale.py --gb $(BENCH_GB)

# For a bare, offline GPU machine (CPython 3.12, torch, transformers, numpy, pytest... but no DeepSpeed, Hydra or
# jieba): every package the GPU check needs that such a machine lacks, pinned to the versions tested here, into .whl/
# (ignored by git; it travels to the GPU machine as a named path). The three sdists (deepspeed, jieba, antlr4) are
# pure Python and are built here into py3-none-any wheels; DeepSpeed's are built with DS_BUILD_OPS=0, so its CUDA ops
# (FusedAdam, FusedLamb) are JIT-built on the GPU from the sources the wheel carries. wandb is not needed:
# logger.wandb.mode=disabled imports nothing of it. Then, there: bash bench/gpu_check.sh OUT (see bench/gpu_check.py).
GPU_WHEELS_BINARY = pydantic-core==2.46.4 pydantic==2.13.4 annotated-types==0.7.0 typing-inspection==0.4.2 \
	typing-extensions==4.15.0 hjson==3.1.0 hydra-core==1.3.8 omegaconf==2.3.1
GPU_WHEELS_SDIST = deepspeed==0.19.8 jieba==0.42.1 antlr4-python3-runtime==4.9.3
GPU_PLATFORMS = $(foreach n,2_17 2_27 2_28 2_34,--platform manylinux_$(n)_x86_64) --platform manylinux2014_x86_64
gpu-wheels: install
	rm -rf .whl .whl.sdist && mkdir -p .whl .whl.sdist
	$(PIP) download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $(GPU_PLATFORMS) \
		-d .whl $(GPU_WHEELS_BINARY)
	$(PIP) download -q --no-deps --no-binary=:all: -d .whl.sdist $(GPU_WHEELS_SDIST)
	DS_BUILD_OPS=0 $(PIP) wheel -q --no-deps --no-build-isolation -w .whl .whl.sdist/*
	rm -rf .whl.sdist
	@ls -1 .whl
	@du -cb .whl/*.whl | tail -1 | awk '{printf "gpu-wheels: %d files, %.1f MiB in .whl/ (the GPU machine takes 64 MiB with the tree)\n", '"$$(ls .whl/*.whl | wc -l)"', $$1 / 1048576}'

# The GPU check's dry run on this CPU: tiny shapes, a few steps, every part (tests/test_gpu_check.py runs it too).
gpu-check-dry-run: install
	bash bench/gpu_check.sh runs/gpu_check_dry_run --dry-run
