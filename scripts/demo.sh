#!/usr/bin/env bash
# Install everything, create an instance in ./demo (SQLite, keys under demo/keys, loopback
# ports) and walk through the mail flow: an encrypted send, a held send, the queue.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec python3 scripts/demo.py "$@"
