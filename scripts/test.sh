#!/usr/bin/env bash
# Install everything, then run the whole test suite (real gpg, openssl, Dovecot, PostgreSQL).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
ruff check mailhub tests bench scripts
python3 -m pytest -q -p no:cacheprovider "$@"
