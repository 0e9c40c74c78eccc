#!/usr/bin/env bash
# Checks vendor/candle-core against the crates.io release of the same version in the cargo
# registry: every source file identical except those that vendor/candle-core/gentrain-*.patch
# change, which must be the release's with those patches applied (in name order). Exit 0 when so, 1 with the differences
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
for p in "$vendored"/gentrain-*.patch; do
    (cd "$tmp" && patch -s -p1 < "$p")
done
if ! diff -r "$tmp/src" "$vendored/src"; then
    echo "check-vendored-candle: vendor/candle-core/src differs from candle-core $version + the patches" >&2
    exit 1
fi
echo "vendor/candle-core: candle-core $version + $(cd "$vendored" && echo gentrain-*.patch)"
