#!/bin/sh
# Builds one fuzz target with libFuzzer and SanitizerCoverage on the stable
# toolchain (what `cargo fuzz run --sanitizer none` does, without cargo-fuzz or
# nightly) and runs it: fuzz/run.sh TARGET [SECONDS] [extra libFuzzer flags].
# New inputs go to fuzz/corpus/TARGET, crashes to fuzz/artifacts/TARGET.
set -eu
target=$1
seconds=${2:-60}
shift $(( $# < 2 ? $# : 2 ))
cd "$(dirname "$0")"
triple=$(rustc -vV | sed -n 's/^host: //p')
# --target keeps the flags off build scripts and proc macros, as cargo-fuzz does.
RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks" \
    cargo build --target "$triple" --bin "$target"
mkdir -p "corpus/$target" "artifacts/$target"
exec "target/$triple/debug/$target" -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 \
    -artifact_prefix="artifacts/$target/" "$@" "corpus/$target"
