#!/usr/bin/env bash
# Sets up the real Stable Diffusion backend for sd-rest on an Apple-silicon Mac (or Linux),
# in four steps:
#   fork    fetches the fork bfirsh/stable-diffusion (branch apple-silicon-mps-support, commit
#           3c9f69e) into vendor/stable-diffusion. Its code is never modified.
#   venv    creates the fork's venv (vendor/stable-diffusion/venv) and installs the pinned
#           package set of scripts/fork-requirements.txt, fork-requirements-no-deps.txt and
#           fork-constraints.txt (not the fork's own requirements.txt of 2022, which no longer
#           installs or imports). Then it runs `verify`.
#   models  downloads the text-to-image and inpaint checkpoints into models/ (resumable; the
#           SHA-256 is checked when known and then kept in <checkpoint>.sha256 for --check).
#   cert    makes cert.pem and key.pem: with mkcert when it is installed (trusted by this
#           machine's browsers and curl), else a self-signed pair with openssl (clients must
#           be told to trust it: the script says how).
# and `verify`: imports everything the fork's three scripts import, with the venv's Python and
# the environment the server gives the scripts, and stops with what failed and how to fix it.
#
#   scripts/setup.sh [STEP...]      STEP: fork, venv, models, cert, verify (default: the first
#                                   four, in that order)
#
# Idempotent: a step already done is skipped (a fetched fork, a venv whose packages have the
# pinned versions, a downloaded checkpoint, an existing certificate), so a second run installs
# and downloads nothing; it only repeats the import check (read-only). After an interruption,
# run it again: downloads resume.
# Needs: curl, tar, git (for a git source), Python 3.11 (macOS: brew install python@3.11).
# Optional: mkcert (brew install mkcert); openssl is used without it.
#
# Overrides (environment variables; relative paths are taken from the current folder):
#   SD_REST_DIR             the folder to set up: vendor/, models/, cert.pem and key.pem go
#                           there (default: the sd-rest checkout that holds this script)
#   SD_REST_FORK            where the fork comes from: a git URL, a local clone (a folder), or a
#                           .tar.gz/.tgz archive of its tree (a path or a URL)
#                           (default https://github.com/bfirsh/stable-diffusion.git)
#   SD_REST_FORK_BRANCH     the branch cloned from a git source (default apple-silicon-mps-support)
#   SD_REST_FORK_COMMIT     the commit checked out from a git source; empty: the branch's tip
#                           (default 3c9f69e1def5e4750a7bdb9888c30dac611e13b0, the proven one)
#   SD_REST_PYTHON          the Python that creates the fork's venv (default python3.11)
#   SD_REST_VENV            where the fork's venv goes (default vendor/stable-diffusion/venv);
#                           anywhere else, vendor/stable-diffusion/venv becomes a symbolic link
#                           to it. An existing venv there is reused.
#   SD_REST_TEXT_TO_IMAGE_URL, SD_REST_INPAINT_URL
#                           where the checkpoints come from (file:// URLs work too)
#   SD_REST_TEXT_TO_IMAGE_SHA256, SD_REST_INPAINT_SHA256
#                           their expected SHA-256; empty: not checked. Default: the published
#                           one for the default text-to-image URL, none otherwise (the inpaint
#                           checkpoint's is not published)
#   SD_REST_CERT_TOOL       auto (mkcert when installed, else openssl), mkcert or openssl
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CHECKOUT=$(dirname "$HERE")

absolute() {  # a path override, taken from the folder the script was started in
  case $1 in
    /* | *://* | *@*:*) printf '%s' "$1" ;;
    *) printf '%s/%s' "$PWD" "$1" ;;
  esac
}

DIR=$(absolute "${SD_REST_DIR:-$CHECKOUT}")
FORK=${SD_REST_FORK:-https://github.com/bfirsh/stable-diffusion.git}
if [ -e "$FORK" ]; then FORK=$(absolute "$FORK"); fi
FORK_BRANCH=${SD_REST_FORK_BRANCH:-apple-silicon-mps-support}
FORK_COMMIT=${SD_REST_FORK_COMMIT-3c9f69e1def5e4750a7bdb9888c30dac611e13b0}
PYTHON=${SD_REST_PYTHON:-python3.11}
REPO=$DIR/vendor/stable-diffusion
VENV=$(absolute "${SD_REST_VENV:-$REPO/venv}")
SD_V1_4_URL='https://www.googleapis.com/storage/v1/b/aai-blog-files/o/sd-v1-4.ckpt?alt=media'
SD_V1_4_SHA256=fe4efff1e174c627256e44ec2991ba279b3816e364b49f9be2abc0b3ff3f8556
TEXT_TO_IMAGE_URL=${SD_REST_TEXT_TO_IMAGE_URL:-$SD_V1_4_URL}
if [ "$TEXT_TO_IMAGE_URL" = "$SD_V1_4_URL" ]; then
  TEXT_TO_IMAGE_SHA256=${SD_REST_TEXT_TO_IMAGE_SHA256-$SD_V1_4_SHA256}
else
  TEXT_TO_IMAGE_SHA256=${SD_REST_TEXT_TO_IMAGE_SHA256:-}
fi
INPAINT_URL=${SD_REST_INPAINT_URL:-https://heibox.uni-heidelberg.de/f/4d9ac7ea40c64582b7c9/?dl=1}
INPAINT_SHA256=${SD_REST_INPAINT_SHA256:-}
CERT_TOOL=${SD_REST_CERT_TOOL:-auto}
PROBE=$CHECKOUT/sd_rest/setup/fork_imports.py
CONSTRAINTS=$HERE/fork-constraints.txt
REQUIREMENTS=$HERE/fork-requirements.txt
REQUIREMENTS_NO_DEPS=$HERE/fork-requirements-no-deps.txt

say() { printf '==> %s\n' "$*"; }
fail() {
  printf 'setup.sh: error: %s\n' "$*" >&2
  exit 1
}
need() {  # command, how to get it
  command -v "$1" >/dev/null 2>&1 || fail "$1 not found: $2"
}

# ------------------------------------------------------------------------------------- fork
source_kind() {
  case $FORK in
    *.tar.gz | *.tgz) echo archive ;;
    *://* | *@*:*) echo git ;;
    *) if [ -d "$FORK" ]; then echo git; else echo missing; fi ;;
  esac
}

step_fork() {
  if [ -f "$REPO/scripts/txt2img.py" ]; then
    say "fork: $REPO is already there"
    return
  fi
  if [ -e "$REPO" ] && [ -n "$(ls -A "$REPO")" ]; then
    fail "$REPO exists but holds no scripts/txt2img.py: move it away and run this again"
  fi
  local partial=$DIR/vendor/.stable-diffusion.partial
  rm -rf "$partial"
  mkdir -p "$DIR/vendor"
  case $(source_kind) in
    git)
      need git "install it (macOS: xcode-select --install)"
      say "fork: cloning $FORK (branch $FORK_BRANCH) into $REPO"
      git clone --quiet --single-branch --branch "$FORK_BRANCH" "$FORK" "$partial" ||
        fail "could not clone branch $FORK_BRANCH of $FORK (check SD_REST_FORK and SD_REST_FORK_BRANCH)"
      if [ -n "$FORK_COMMIT" ]; then
        git -C "$partial" checkout --quiet --detach "$FORK_COMMIT" 2>/dev/null ||
          fail "commit $FORK_COMMIT is not on branch $FORK_BRANCH of $FORK (SD_REST_FORK_COMMIT= takes the branch's tip)"
      fi
      ;;
    archive)
      local archive=$FORK
      if [[ $FORK == *://* ]]; then
        archive=$DIR/vendor/.stable-diffusion.tar.gz
        say "fork: downloading $FORK"
        curl --fail --location --progress-bar --output "$archive" "$FORK" || fail "could not download $FORK"
      fi
      say "fork: unpacking $archive into $REPO"
      mkdir -p "$partial"
      tar -xzf "$archive" -C "$partial" || fail "could not unpack $archive (is it a .tar.gz of the fork?)"
      # An archive has no history: the commit git wrote into it (GitHub's archives carry it) is
      # kept for the images' metadata (sd_rest/runs/provenance.py), once the tree is in place.
      local commit=""
      if command -v git >/dev/null; then
        commit=$(gzip -dc "$archive" 2>/dev/null | git get-tar-commit-id 2>/dev/null || true)
      fi
      if [[ $FORK == *://* ]]; then rm -f "$archive"; fi
      # Archives hold the tree inside one top folder (GitHub's do, as `stable-diffusion-<commit>`).
      local inner
      inner=$(find "$partial" -mindepth 1 -maxdepth 1)
      if [ ! -d "$partial/scripts" ] && [ "$(printf '%s\n' "$inner" | wc -l)" -eq 1 ] && [ -d "$inner" ]; then
        mv "$inner" "$partial.inner" && rmdir "$partial" && mv "$partial.inner" "$partial"
      fi
      # Not code: the fork's tree itself is untouched.
      if [ -n "$commit" ]; then printf '%s\n' "$commit" > "$partial/.source-commit"; fi
      ;;
    *) fail "SD_REST_FORK=$FORK is neither a git URL, a folder nor a .tar.gz archive" ;;
  esac
  for script in txt2img.py img2img.py inpaint.py; do
    [ -f "$partial/scripts/$script" ] || fail "$FORK is not the Stable Diffusion fork: it has no scripts/$script"
  done
  rm -rf "$REPO" # at most an empty folder, checked above
  mv "$partial" "$REPO"
}

# ------------------------------------------------------------------------------------- venv
# Compares the venv's packages with the pins: every required package installed at its pinned
# version, every other pinned package that is installed too. Prints what differs.
pins_differ() {
  "$VENV/bin/python" - "$CONSTRAINTS" "$REQUIREMENTS" "$REQUIREMENTS_NO_DEPS" <<'EOF'
import re, sys
from importlib.metadata import distributions

def names(path):
    for line in open(path, encoding="utf-8"):
        line = line.split("#", 1)[0].strip()
        if line:
            yield line

def key(name):
    return re.sub(r"[-_.]+", "-", name).lower()

pinned = dict(tuple(map(str.strip, line.split("=="))) for line in names(sys.argv[1]))
pinned = {key(name): version for name, version in pinned.items()}
required = {key(name) for path in sys.argv[2:] for name in names(path)}
installed = {
    key(d.metadata["Name"]): d.version.split("+")[0]  # 2.13.0+cpu is 2.13.0
    for d in distributions()
    if d.metadata["Name"]
}
conflicts = {"opencv-python", "taming-transformers"} & installed.keys()
if conflicts:
    print(f"conflicting packages installed: {' '.join(sorted(conflicts))}")
    sys.exit(2)
differ = [
    f"{name} {installed.get(name, '(not installed)')}, pinned {version}"
    for name, version in sorted(pinned.items())
    if (name in required or name in installed) and installed.get(name) != version
]
print("\n".join(differ))
sys.exit(1 if differ else 0)
EOF
}

step_venv() {
  [ -f "$REPO/scripts/txt2img.py" ] || fail "the fork is not in $REPO yet: run scripts/setup.sh fork"
  if [ -L "$VENV/bin/python" ] && [ ! -e "$VENV/bin/python" ]; then
    fail "the venv $VENV is broken: its python links to $(readlink "$VENV/bin/python"), which is gone (was that Python removed or upgraded?): delete $VENV and run this again"
  fi
  if [ ! -e "$VENV/bin/python" ]; then
    local python
    python=$(command -v "$PYTHON") ||
      fail "$PYTHON not found: install it (macOS: brew install python@3.11) or set SD_REST_PYTHON"
    "$python" - <<'EOF' || fail "$python cannot make the fork's venv (see above): set SD_REST_PYTHON to a Python 3.11"
import platform, sys
version = "%d.%d" % sys.version_info[:2]
if sys.platform == "darwin" and platform.machine() != "arm64":
    sys.exit(f"{sys.executable} is an Intel (x86_64) Python: PyTorch has no MPS for it; use the arm64 one (Homebrew in /opt/homebrew)")
if not (3, 10) <= sys.version_info[:2] <= (3, 13):
    sys.exit(f"Python {version} is outside 3.10-3.13")
if version != "3.11":
    print(f"note: the pinned package set was verified with Python 3.11, this is {version}")
EOF
    say "venv: creating $VENV with $python"
    mkdir -p "$(dirname "$VENV")"
    "$python" -m venv "$VENV"
  elif ! "$VENV/bin/python" -c '' 2>/dev/null; then
    fail "the venv $VENV is broken, its python does not run (was the Python that made it removed or upgraded?): delete $VENV and run this again"
  fi
  if [ "$VENV" != "$REPO/venv" ]; then
    if [ -e "$REPO/venv" ] && [ ! -L "$REPO/venv" ]; then
      fail "$REPO/venv exists and is not a link to $VENV: remove it, or unset SD_REST_VENV"
    fi
    ln -sfn "$VENV" "$REPO/venv"
  fi
  local differ status=0
  differ=$(pins_differ) || status=$?
  if [ "$status" -eq 2 ]; then
    fail "$VENV has $differ, which the pinned set replaces: delete $VENV (or set SD_REST_VENV to a new folder) and run this again"
  elif [ "$status" -eq 0 ]; then
    say "venv: every package already has its pinned version"
  else
    say "venv: installing the pinned packages into $VENV (first time: several minutes)"
    local pip=("$VENV/bin/python" -m pip --disable-pip-version-check install -c "$CONSTRAINTS")
    "${pip[@]}" -r "$REQUIREMENTS" || fail "pip could not install the pinned packages (see above)"
    "${pip[@]}" --no-deps -r "$REQUIREMENTS_NO_DEPS" || fail "pip could not install the pinned packages (see above)"
    status=0
    differ=$(pins_differ) || status=$?
    [ "$status" -eq 0 ] || fail "after installing, these packages differ from fork-constraints.txt: $differ"
  fi
  step_verify
}

step_verify() {
  [ -e "$REPO/venv/bin/python" ] || fail "no venv at $REPO/venv: run scripts/setup.sh venv"
  say "verify: importing what the fork's scripts import (as the server runs them)"
  # The server's environment for the scripts (sd_rest/scripts.py:script_environment).
  if (cd "$REPO" && env -u PYTHONHOME PYTHONPATH="$REPO" PYTORCH_ENABLE_MPS_FALLBACK=1 \
    PYTHONUNBUFFERED=1 "$REPO/venv/bin/python" - --constraints "$CONSTRAINTS" <"$PROBE"); then
    say "verify: the fork's venv is ready"
  else
    fail "the fork's venv cannot import what the scripts need: fix the problems listed above, then run this again"
  fi
}

# ----------------------------------------------------------------------------------- models
sha256_of() {
  if command -v shasum >/dev/null 2>&1; then shasum -a 256 "$1"; else sha256sum "$1"; fi | cut -d' ' -f1
}

download() {  # label url target sha256-or-empty
  local label=$1 url=$2 target=$3 sha=$4
  if [ -f "$target" ]; then
    say "models: $target is already there"
    return
  fi
  need curl "install it"
  say "models: downloading the $label checkpoint into $target"
  mkdir -p "$(dirname "$target")"
  curl --fail --location --continue-at - --progress-bar --output "$target.part" "$url" ||
    fail "could not download $url: run this again to resume"
  # A moved link often answers with a web page instead of the file.
  local head
  head=$(od -An -tx1 -N2 "$target.part" | tr -d ' \n')
  case $head in
    504b | 8002 | 8003 | 8004 | 8005) ;;
    *) fail "$url did not send a PyTorch checkpoint (it starts with: $(head -c 60 "$target.part" | tr -cd '[:print:]')): delete $target.part and check the URL" ;;
  esac
  if [ -n "$sha" ]; then
    say "models: checking the SHA-256 of $target"
    local got
    got=$(sha256_of "$target.part")
    [ "$got" = "$sha" ] ||
      fail "$target.part has SHA-256 $got, not $sha: delete it and run this again"
    printf '%s  %s\n' "$sha" "$(basename "$target")" >"$target.sha256"
  fi
  mv "$target.part" "$target"
}

step_models() {
  download text-to-image "$TEXT_TO_IMAGE_URL" "$DIR/models/text-to-image.ckpt" "$TEXT_TO_IMAGE_SHA256"
  download inpaint "$INPAINT_URL" "$DIR/models/inpaint-image.ckpt" "$INPAINT_SHA256"
}

# ------------------------------------------------------------------------------------- cert
self_signed() {
  local config
  config=$(mktemp)
  # Apple's rules for a TLS server certificate: SAN, serverAuth, at most 825 days.
  cat >"$config" <<'EOF'
[req]
distinguished_name = dn
x509_extensions = ext
prompt = no
[dn]
CN = localhost
[ext]
subjectAltName = DNS:localhost,IP:127.0.0.1,IP:0.0.0.0,IP:::1
extendedKeyUsage = serverAuth
EOF
  (umask 077 && openssl req -x509 -newkey rsa:2048 -nodes -days 825 -config "$config" \
    -keyout key.pem.tmp -out cert.pem.tmp 2>/dev/null) || { rm -f "$config"; fail "openssl could not make a certificate"; }
  rm -f "$config"
}

step_cert() {
  if [ -f cert.pem ] && [ -f key.pem ]; then
    say "cert: cert.pem and key.pem are already there"
    return
  fi
  if [ -e cert.pem ] || [ -e key.pem ]; then
    fail "only one of $DIR/cert.pem and key.pem exists: remove it and run this again"
  fi
  local tool=$CERT_TOOL
  if [ "$tool" = auto ]; then
    if command -v mkcert >/dev/null 2>&1; then tool=mkcert; else tool=openssl; fi
  fi
  case $tool in
    mkcert)
      need mkcert "install it (brew install mkcert), or use SD_REST_CERT_TOOL=openssl"
      say "cert: making cert.pem and key.pem with mkcert (its CA is installed first: it may ask for your password)"
      mkcert -install
      mkcert -cert-file cert.pem.tmp -key-file key.pem.tmp 0.0.0.0 localhost 127.0.0.1 ::1
      ;;
    openssl)
      need openssl "install it, or mkcert (brew install mkcert)"
      say "cert: making a self-signed cert.pem and key.pem with openssl (mkcert is not installed)"
      self_signed
      cat <<EOF
    Nothing trusts this certificate yet. Either tell each client (curl --cacert $DIR/cert.pem,
    or curl -k), or trust it on this Mac:
      sudo security add-trusted-cert -d -r trustRoot -k /Library/Keychains/System.keychain $DIR/cert.pem
    or install mkcert (brew install mkcert), delete cert.pem and key.pem, and run this again.
EOF
      ;;
    *) fail "SD_REST_CERT_TOOL=$tool: use auto, mkcert or openssl" ;;
  esac
  chmod 600 key.pem.tmp
  chmod 644 cert.pem.tmp
  mv key.pem.tmp key.pem
  mv cert.pem.tmp cert.pem
}

# ------------------------------------------------------------------------------------- main
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(fork venv models cert)
for step in "${steps[@]}"; do
  case $step in
    fork | venv | models | cert | verify) ;;
    *) fail "unknown step $step: use fork, venv, models, cert or verify" ;;
  esac
done
mkdir -p "$DIR"
cd "$DIR"
for step in "${steps[@]}"; do
  "step_$step"
done
say "done"
if [ $# -eq 0 ]; then
  if [ -e "$DIR/stable-diffusion" ]; then
    echo "note: $DIR/stable-diffusion exists, and the server prefers it to vendor/stable-diffusion: pass --repository vendor/stable-diffusion, or move it away"
  fi
  cat <<EOF
Next, in $DIR:
  $CHECKOUT/.venv/bin/stable-diffusion-rest-api --check   # everything in place?
  $CHECKOUT/.venv/bin/stable-diffusion-rest-api           # serve on https://localhost:8888
(without $CHECKOUT/.venv: python3 -m venv $CHECKOUT/.venv && $CHECKOUT/.venv/bin/pip install -e $CHECKOUT)
EOF
fi
