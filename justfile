# Impetus — the front door. `just --list` shows every recipe.
# Each recipe is a plain cargo/shell line you can also run by hand.

set shell := ["bash", "-euo", "pipefail", "-c"]

# Build artefacts go outside the clone unless the caller chose a target dir.
export CARGO_TARGET_DIR := env_var_or_default("CARGO_TARGET_DIR", env_var("HOME") + "/.cache/impetus-target")

default:
    @just --list

# Install what the build needs (idempotent): the wasm32-wasip1 target for the example jobs.
setup:
    rustup target add wasm32-wasip1

# Build the example wasm jobs into examples/jobs/wasm/.
jobs: setup
    if [ -x examples/jobs/build.sh ]; then examples/jobs/build.sh; fi

# Run a local demo cluster (the README's first command).
demo: jobs
    cargo run --release -p impetus-node --bin impetus -- demo

# Everything CI checks: formatting, lints, every test, then a simulation sweep
# with the determinism check.
test: jobs
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings
    cargo test --workspace
    cargo run --release -p impetus-simulation -- --seeds 300
    cargo run --release -p impetus-simulation -- --seeds 20 --check-determinism

# Benchmarks: `just bench` runs all; `just bench queue|exec|net|peer|cluster` one of them.
bench which="all": jobs
    if [ "{{which}}" = all ] || [ "{{which}}" = queue ]; then cargo bench -p impetus-queue --bench queue; fi
    if [ "{{which}}" = all ] || [ "{{which}}" = exec ]; then cargo bench -p impetus-node --bench exec; fi
    if [ "{{which}}" = all ] || [ "{{which}}" = net ]; then cargo bench -p impetus-node --bench net; fi
    if [ "{{which}}" = all ] || [ "{{which}}" = peer ]; then cargo bench -p impetus-tests --bench single_peer; fi
    if [ "{{which}}" = all ] || [ "{{which}}" = cluster ]; then cargo bench -p impetus-tests --bench cluster; fi

# Format the code.
fmt:
    cargo fmt --all

# Deterministic simulation: `just simulate` sweeps 1000 seeds; a failure prints the replay command.
simulate seeds="1000":
    cargo run --release -p impetus-simulation -- --seeds {{seeds}}
