#!/usr/bin/env bash
# Builds the example jobs for wasm32-wasip1 and copies the modules into wasm/.
# Idempotent. Usage: examples/jobs/build.sh   (from anywhere)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1; then
    rustup target add wasm32-wasip1
fi

# Our own target dir (not an inherited CARGO_TARGET_DIR meant for the host workspace).
target_dir="${IMPETUS_JOBS_TARGET_DIR:-$here/target}"
CARGO_TARGET_DIR="$target_dir" cargo build --release --quiet

mkdir -p wasm
for src in src/bin/*.rs; do
    name="$(basename "$src" .rs)"
    cp -f "$target_dir/wasm32-wasip1/release/$name.wasm" "wasm/$name.wasm.tmp"
    mv -f "wasm/$name.wasm.tmp" "wasm/$name.wasm"
done
echo "built $(ls wasm/*.wasm | wc -l) modules in $here/wasm"
