#!/usr/bin/env bash
# Install what mailhub needs on a fresh Debian machine: system packages (only when missing)
# and the Python package with its test tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v gpg >/dev/null 2>&1 || need+=(gnupg)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
[ -x /usr/sbin/dovecot ] || need+=(dovecot-imapd)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v runuser >/dev/null 2>&1 || need+=(util-linux)
if [ "${MAILHUB_BENCH:-0}" = 1 ] && [ ! -x /usr/sbin/smtp-sink ]; then need+=(postfix); fi
if [ ${#need[@]} -gt 0 ]; then
  echo "installing system packages: ${need[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
  # The Debian packages start system-wide services; mailhub runs its own private instances.
  for svc in dovecot postgresql postfix; do $SUDO service "$svc" stop >/dev/null 2>&1 || true; done
fi
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
