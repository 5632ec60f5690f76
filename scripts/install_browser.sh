#!/usr/bin/env bash
# Make a headless browser available for the web-page test (tests/serve/test_web.py): Debian's `chromium`,
# driven by the Playwright Python package against /usr/bin/chromium (Playwright's own browser download is
# never used). Idempotent and best effort: it installs only when chromium is missing and apt-get can run as
# root; otherwise it says why and exits 0, and the browser test skips with that reason.
#   P2N_SKIP_BROWSER_INSTALL=1   never install (the test then skips unless chromium is already there)
set -uo pipefail

if [ -n "${P2N_CHROMIUM:-}" ] && [ -x "${P2N_CHROMIUM}" ]; then
  echo "install_browser: using P2N_CHROMIUM=${P2N_CHROMIUM}"; exit 0
fi
for b in /usr/bin/chromium /usr/bin/chromium-browser; do
  if [ -x "$b" ]; then echo "install_browser: $b present ($("$b" --version 2>/dev/null | head -1))"; exit 0; fi
done
if [ "${P2N_SKIP_BROWSER_INSTALL:-0}" = "1" ]; then
  echo "install_browser: chromium missing and P2N_SKIP_BROWSER_INSTALL=1; the browser test will skip"; exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_browser: chromium missing and no apt-get here (not Debian/Ubuntu); the browser test will skip"; exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "install_browser: chromium missing and not root (no passwordless sudo); run"
    echo "  apt-get install -y chromium   as root, or the browser test will skip"; exit 0
  fi
fi
echo "install_browser: installing Debian chromium (apt-get install -y --no-install-recommends chromium) ..."
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y --no-install-recommends chromium >/tmp/p2n-install-browser.log 2>&1; then
  # Stale package lists are the usual cause: refresh them once and try again.
  $SUDO apt-get update >>/tmp/p2n-install-browser.log 2>&1
  if ! $SUDO apt-get install -y --no-install-recommends chromium >>/tmp/p2n-install-browser.log 2>&1; then
    echo "install_browser: apt-get could not install chromium (log: /tmp/p2n-install-browser.log);"
    echo "  the browser test will skip"
    tail -5 /tmp/p2n-install-browser.log; exit 0
  fi
fi
echo "install_browser: $(/usr/bin/chromium --version 2>/dev/null | head -1) at /usr/bin/chromium"
