#!/usr/bin/env bash
# Set up a machine for mmadapt: the package with its test extras, and Debian's Chromium for the browser tests.
# Run it inside the virtualenv you want the package in. Chromium comes from apt when this runs as root (or with
# password-less sudo); otherwise the browser tests skip and name the command. Nothing here downloads a browser build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -e ".[dev]"
command -v chromium >/dev/null && command -v chromedriver >/dev/null && exit 0
command="apt-get install -y -qq --no-install-recommends chromium chromium-driver"
if [ "$(id -u)" = 0 ]; then as_root=""
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then as_root="sudo -n"
else as_root="none"; fi
if [ "$as_root" != none ] && command -v apt-get >/dev/null; then
    $as_root apt-get update -qq && $as_root env DEBIAN_FRONTEND=noninteractive $command \
        || echo "setup: could not install chromium; the browser tests will skip (run: sudo $command)" >&2
else
    echo "setup: not root and no apt-get; the browser tests will skip until: sudo $command" >&2
fi
