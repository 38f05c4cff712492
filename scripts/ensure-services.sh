#!/usr/bin/env bash
# Start the machine's PostgreSQL and MariaDB if they are installed but not answering (tests use both for real).
set -u
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
if ! port_open 5432 && command -v pg_ctlcluster >/dev/null 2>&1; then
  for version in /etc/postgresql/*; do
    pg_ctlcluster --skip-systemctl-redirect "$(basename "$version")" main start || true
  done
fi
if ! port_open 3306 && [ -x /usr/sbin/mariadbd ]; then
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd || true
  for _ in $(seq 30); do port_open 3306 && break; sleep 1; done
fi
# Debian's Chromium for the monitoring page's browser test (Playwright drives it; no browser download).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium" >&2
fi
# Build dependencies of the DIRAC side venv (tests/sidevenvs.py): M2Crypto needs swig + OpenSSL headers,
# mysqlclient the MariaDB client headers and pkg-config.
dirac_debs="swig libssl-dev libmariadb-dev pkg-config"
# shellcheck disable=SC2086
if ! dpkg -s $dirac_debs >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  # shellcheck disable=SC2086
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $dirac_debs >/dev/null) \
    || echo "warning: could not install $dirac_debs (the DIRAC side venv will not build)" >&2
fi
# Podman (with runc) and busybox-static for the container tests (tests/runner/test_containers.py).
container_debs="podman runc busybox-static"
# shellcheck disable=SC2086
if ! dpkg -s $container_debs >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  # shellcheck disable=SC2086
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $container_debs >/dev/null) \
    || echo "warning: could not install $container_debs (the container tests will be skipped)" >&2
fi
# NorduGrid ARC 6 (A-REX with its REST interface, arcctl's test CA, arcproxy) for the ARC CE tests
# (tests/sitedirector/test_arc.py starts its own private A-REX; nothing is enabled or started here).
arc_debs="nordugrid-arc-arex nordugrid-arc-arcctl nordugrid-arc-arcctl-service nordugrid-arc-client nordugrid-arc-plugins-needed"
# shellcheck disable=SC2086
if ! dpkg -s $arc_debs >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  # shellcheck disable=SC2086
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $arc_debs >/dev/null) \
    || echo "warning: could not install $arc_debs (the ARC CE tests will be skipped)" >&2
fi
port_open 5432 || echo "warning: PostgreSQL is not answering on 127.0.0.1:5432" >&2
port_open 3306 || echo "warning: MariaDB is not answering on 127.0.0.1:3306" >&2
exit 0
