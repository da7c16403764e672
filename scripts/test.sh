#!/usr/bin/env bash
# The one command that runs quantd's whole test suite on a fresh machine (README, .ci/run).
# It installs what is missing (unzip, curl, python venv), lays out the SmolLM2 fixture and a
# Python with the reference `gguf` reader, then runs every test.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

need_apt=()
command -v unzip >/dev/null || need_apt+=(unzip)
command -v curl >/dev/null || need_apt+=(curl)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
if ((${#need_apt[@]})); then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi
command -v cargo >/dev/null || { echo "cargo is required (rustup toolchain)" >&2; exit 1; }

# The fixture comes from the shared folder laid beside every checkout (and CI's clone).
FETCH=../shared/fixtures/fetch-smollm2.sh
[[ -f $FETCH ]] || { echo "missing $FETCH: the shared/ folder must sit beside the repository" >&2; exit 1; }
export QUANTD_FIXTURES=${QUANTD_FIXTURES:-$HOME/.cache/quantd-fixtures}
FIXTURE=$(bash "$FETCH" "$QUANTD_FIXTURES/smollm2-135m")
# fetch-smollm2.sh leaves a venv with numpy, gguf and safetensors beside the fixture.
export QUANTD_PYTHON=${QUANTD_PYTHON:-$(dirname "$FIXTURE")/.venv/bin/python}
"$QUANTD_PYTHON" -c 'import gguf, numpy' >/dev/null
# The official OpenAI client drives the server in tests/openai_client.rs.
"$QUANTD_PYTHON" -c 'import openai' 2>/dev/null ||
  "$QUANTD_PYTHON" -m pip install -q --disable-pip-version-check 'openai>=1.50,<3'

cargo test --locked --all-targets "$@"
