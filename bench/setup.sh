#!/usr/bin/env bash
# What `make bench` needs, on a fresh Debian machine: mutt (for its mutt_oauth2.py),
# gnupg, a C compiler for the load generator, and mailoauthd installed into
# bench/.venv the way users install it (a wheel, not the editable development
# install, whose import hooks run at every interpreter start-up).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

have_mutt_oauth2() { ls /usr/share/doc/mutt/examples/mutt_oauth2.py* >/dev/null 2>&1; }

need=()
have_mutt_oauth2 || need+=(mutt)
command -v gpg >/dev/null || need+=(gnupg)
command -v gpg-agent >/dev/null || need+=(gpg-agent)
command -v gcc >/dev/null || need+=(gcc libc6-dev)
python3 -m venv --help >/dev/null 2>&1 || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "bench/setup.sh: please install: ${need[*]}" >&2
        exit 1
    fi
    echo "bench/setup.sh: installing ${need[*]}" >&2
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if ! have_mutt_oauth2; then
    # Images that drop /usr/share/doc (dpkg path-exclude): take the script from the package.
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download mutt >/dev/null && dpkg-deb -x mutt_*.deb root)
    mkdir -p /usr/share/doc/mutt/examples
    cp "$tmp"/root/usr/share/doc/mutt/examples/mutt_oauth2.py* /usr/share/doc/mutt/examples/
    rm -rf "$tmp"
fi

# Built from a copy of the tree, so that the build leaves nothing in it.
rm -rf bench/.venv
python3 -m venv bench/.venv
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
# Everything pyproject.toml names: the package, the script, and the data files.
cp -r pyproject.toml README.md LICENSE bin mailoauthd etc systemd docs share "$src"/
find "$src"/mailoauthd -name __pycache__ -prune -exec rm -rf {} +
bench/.venv/bin/pip install --quiet --disable-pip-version-check "$src" 2>&1 | grep -v "^WARNING: Location" >&2 || true
bench/.venv/bin/python -c "import mailoauthd, mailoauthd.proxy, trio, httpx" # the install worked
