#!/usr/bin/env bash
# Sets up the real Stable Diffusion backend for sd-rest, on an Apple-silicon Mac (or Linux+CUDA):
#   1. clones the fork bfirsh/stable-diffusion (branch apple-silicon-mps-support) into
#      vendor/stable-diffusion,
#   2. creates its venv (vendor/stable-diffusion/venv) and installs its requirements,
#   3. downloads the text-to-image and inpaint checkpoints into models/ (resumable, with
#      progress, SHA-256 verified where the checksum is published),
#   4. makes cert.pem/key.pem with mkcert.
# Idempotent: every step is skipped when already done, so run it again after an interruption.
# Needs git, curl, python3.10 (brew install python@3.10) and mkcert (brew install mkcert).
# It needs the internet and several GB of disk, so it was never run in the development
# sandbox (which has neither a network nor a GPU); it is checked there with `bash -n` only.
set -euo pipefail
cd "$(dirname "$0")/.."

REPO=vendor/stable-diffusion
FORK=https://github.com/bfirsh/stable-diffusion.git
BRANCH=apple-silicon-mps-support
PYTHON=${PYTHON:-python3.10}
TEXT_TO_IMAGE_URL='https://www.googleapis.com/storage/v1/b/aai-blog-files/o/sd-v1-4.ckpt?alt=media'
TEXT_TO_IMAGE_SHA256=fe4efff1e174c627256e44ec2991ba279b3816e364b49f9be2abc0b3ff3f8556
INPAINT_URL='https://heibox.uni-heidelberg.de/f/4d9ac7ea40c64582b7c9/?dl=1'
INPAINT_SHA256=''  # not published

say() { printf '\n==> %s\n' "$*"; }

if [ ! -d "$REPO/.git" ]; then
  say "cloning $FORK ($BRANCH) into $REPO"
  mkdir -p vendor
  git clone --branch "$BRANCH" "$FORK" "$REPO"
else
  say "$REPO already cloned"
fi

if [ ! -x "$REPO/venv/bin/python" ]; then
  say "creating $REPO/venv with $PYTHON"
  "$PYTHON" -m venv "$REPO/venv"
fi
stamp="$REPO/venv/.sd-rest-requirements"
wanted=$(shasum -a 256 "$REPO/requirements.txt" | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  say "installing the fork's requirements"
  # requirements.txt installs the repository itself with `-e .`: run from inside it.
  (cd "$REPO" && venv/bin/python -m pip install --upgrade pip && venv/bin/python -m pip install -r requirements.txt)
  echo "$wanted" >"$stamp"
else
  say "requirements already installed"
fi

download() {  # url target sha256-or-empty
  local url=$1 target=$2 sha=$3
  if [ -f "$target" ]; then
    say "$target already downloaded"
    return
  fi
  say "downloading $target"
  mkdir -p "$(dirname "$target")"
  curl --fail --location --continue-at - --progress-bar --output "$target.part" "$url"
  if [ -n "$sha" ]; then
    say "verifying $target"
    if ! echo "$sha  $target.part" | shasum -a 256 -c -; then
      echo "checksum mismatch: remove $target.part and run this script again" >&2
      exit 1
    fi
  fi
  mv "$target.part" "$target"
}
download "$TEXT_TO_IMAGE_URL" models/text-to-image.ckpt "$TEXT_TO_IMAGE_SHA256"
download "$INPAINT_URL" models/inpaint-image.ckpt "$INPAINT_SHA256"

if [ ! -f cert.pem ] || [ ! -f key.pem ]; then
  say "making cert.pem and key.pem with mkcert"
  mkcert -install
  mkcert -cert-file cert.pem -key-file key.pem 0.0.0.0 localhost 127.0.0.1
else
  say "cert.pem and key.pem already exist"
fi

say "done: start the server with .venv/bin/stable-diffusion-rest-api (see README.md)"
