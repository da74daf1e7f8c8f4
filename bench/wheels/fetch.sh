#!/usr/bin/env bash
# Download the small wheels bench/gpu_check.sh installs on a GPU machine that has no package index.
# Run on any machine with internet (here, not there): bash bench/wheels/fetch.sh  [PYTHON_VERSION, default 3.12]
# The versions are the ones the project is tested with; tomli has a compiled wheel per Python version.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip download --no-deps --only-binary=:all: --python-version "${1:-3.12}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d . webdataset==1.0.2 braceexpand==0.1.7 tomli==2.5.0
ls -l ./*.whl
