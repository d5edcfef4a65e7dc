#!/usr/bin/env bash
# Long fuzz runs with cargo-fuzz (libFuzzer) on the stable toolchain.
#
#   scripts/fuzz.sh [TARGET|all] [SECONDS]
#
# Runs each target for SECONDS (default 180) on one job, seeded from the
# hand-written seeds in crates/fuzz-targets/src/seeds.rs, and prints one
# line per target: executions, exec/s, coverage, features, crashes.
# Builds are optimised with debug assertions (overflow checks) on.
# Crash inputs land in fuzz/artifacts/<target>/. Set FUZZ_SANITIZER=address
# to try ASan (needs a nightly-capable toolchain; the default is none).
set -euo pipefail

cd "$(dirname "$0")/.."
root=$PWD
target=${1:-all}
seconds=${2:-180}
sanitizer=${FUZZ_SANITIZER:-none}

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

# cargo-fuzz passes nightly-only flags (-Z, -Cpasses=sancov-module);
# RUSTC_BOOTSTRAP lets the stable compiler accept them.
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/fuzz/target}

all=(aes bdif cfg pvpanic pl031 pl061 pl011 virtio_blk virtio_blk_apple virtio_net virtio_gpu xhci control_request fuse_request vsock_packet snapshot msix loadstore vnc_client)
if [[ $target == all ]]; then
    targets=("${all[@]}")
else
    targets=("$target")
fi

# Seed corpora from the smoke-test seeds.
cargo run -q -p fuzz-targets --example write_seeds -- "$root/fuzz/corpus"

cd fuzz
mkdir -p target
if ! cargo fuzz build -O -a -s "$sanitizer" >target/fuzz-build.log 2>&1; then
    cat target/fuzz-build.log >&2
    exit 1
fi
printf '%-18s %8s %12s %10s %8s %10s %8s\n' target seconds execs exec/s cov ft crashes
status=0
for t in "${targets[@]}"; do
    log=$root/fuzz/target/fuzz-$t.log
    mkdir -p "$(dirname "$log")" "artifacts/$t"
    set +e
    cargo fuzz run -O -a -s "$sanitizer" "$t" "corpus/$t" -- \
        -max_total_time="$seconds" -max_len=16384 -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 >"$log" 2>&1
    rc=$?
    set -e
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    last=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
    cov=$(sed -n 's/.*cov: \([0-9]*\).*/\1/p' <<<"$last")
    ft=$(sed -n 's/.*ft: \([0-9]*\).*/\1/p' <<<"$last")
    crashes=$(find "artifacts/$t" -type f \( -name 'crash-*' -o -name 'oom-*' -o -name 'timeout-*' -o -name 'leak-*' \) | wc -l)
    if [[ $rc -ne 0 || $crashes -ne 0 ]]; then
        status=1
    fi
    printf '%-18s %8s %12s %10s %8s %10s %8s\n' "$t" "$seconds" "${execs:-?}" "${rate:-?}" \
        "${cov:-?}" "${ft:-?}" "$crashes"
done
exit $status
