#!/usr/bin/env bash
# Debian's bubblewrap (`bwrap`), the kernel isolation of the code sandbox (src/tether/rewards/sandbox/). Installs only
# when missing, quietly, and never fails the CI itself: without apt (or without permission) the hostile-program tests
# (tests/test_sandbox_hostile.py) fail loudly instead, naming the missing bwrap, and code rewards refuse to run.
set -u
if command -v bwrap >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_bwrap: apt-get not available; install bubblewrap by hand (the sandbox refuses to run without it)" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "install_bwrap: not root and no sudo; install bubblewrap by hand (the sandbox refuses to run without it)" >&2
    exit 0
  fi
fi
export DEBIAN_FRONTEND=noninteractive
if ! { $SUDO apt-get install -y -qq bubblewrap || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq bubblewrap; }; } \
    >/tmp/install_bwrap.log 2>&1; then
  echo "install_bwrap: could not install bubblewrap (see /tmp/install_bwrap.log); the sandbox refuses to run without it" >&2
fi
exit 0
