# Sourced by scripts/demo and scripts/test: makes .venv (if missing), installs abopt into it
# (again whenever pyproject.toml changed), and on Linux installs and preloads OpenBLAS,
# because mlx[cpu]'s bundled reference BLAS is ~30x slower (see README, "Linux CPUs").
# Usage: ABOPT_EXTRAS=test source scripts/_setup.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

find_python() {
  for candidate in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
      "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  echo "abopt needs Python >= 3.11: install it, or set PYTHON=/path/to/python3.11" >&2
  return 1
}

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV"
  "$(find_python)" -m venv "$VENV"
fi

extras="${ABOPT_EXTRAS:-}"
stamp="$VENV/.abopt-install-$( (cat "$ROOT/pyproject.toml"; echo "$extras") | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "==> installing abopt${extras:+[$extras]} into $VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT${extras:+[$extras]}"
  rm -f "$VENV"/.abopt-install-*
  touch "$stamp"
fi

# Installs Debian packages when missing: as root directly, else through sudo if it needs no password.
apt_install() {
  local runner=""
  if [ "$(id -u)" != 0 ]; then
    if sudo -n true 2>/dev/null; then runner="sudo -n"; else
      echo "warning: missing Debian package(s) $*; install them with: sudo apt-get install $*" >&2
      return 1
    fi
  fi
  echo "==> installing $* (apt)"
  $runner apt-get install -y -qq "$@" >/dev/null 2>&1 ||
    { $runner apt-get update -qq >/dev/null 2>&1 && $runner apt-get install -y -qq "$@" >/dev/null; }
}

if [ "$(uname -s)" = Linux ]; then
  blas="$(/sbin/ldconfig -p 2>/dev/null | awk '/libopenblas\.so\.0/ {print $NF; exit}')"
  if [ -z "$blas" ] && command -v apt-get >/dev/null 2>&1; then
    apt_install libopenblas0-pthread || true
    blas="$(/sbin/ldconfig -p 2>/dev/null | awk '/libopenblas\.so\.0/ {print $NF; exit}')"
  fi
  if [ -n "$blas" ]; then
    export LD_PRELOAD="$blas${LD_PRELOAD:+:$LD_PRELOAD}"
  else
    echo "warning: OpenBLAS not found; MLX on this CPU will be ~30x slower" >&2
  fi
  # The tests render the HTML report in headless Chromium (pytest -m browser).
  if [[ ",$extras," == *,test,* ]] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    apt_install chromium || true
  fi
fi

export PATH="$VENV/bin:$PATH"
