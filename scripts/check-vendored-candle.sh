#!/usr/bin/env bash
# Checks vendor/candle-core against the crates.io release of the same version in the cargo
# registry: every source file identical except src/backprop.rs, which must be the release's with
# vendor/candle-core/gentrain-backprop.patch applied. Exit 0 when so, 1 with the differences
# otherwise, 2 when the release is not in the registry (run `cargo fetch` first).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
vendored="$root/vendor/candle-core"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$vendored/Cargo.toml" | head -1)
registry=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/candle-core-"$version" 2>/dev/null | head -1 || true)
if [[ -z "$registry" ]]; then
    echo "check-vendored-candle: candle-core $version is not in the cargo registry (run cargo fetch)" >&2
    exit 2
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp -r "$registry/src" "$tmp/src"
(cd "$tmp" && patch -s -p1 < "$vendored/gentrain-backprop.patch")
if ! diff -r "$tmp/src" "$vendored/src"; then
    echo "check-vendored-candle: vendor/candle-core/src differs from candle-core $version + the patch" >&2
    exit 1
fi
echo "vendor/candle-core: candle-core $version + gentrain-backprop.patch"
