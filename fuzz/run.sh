#!/usr/bin/env bash
# Runs AFL++ (cargo afl, stable toolchain) on one target until it has done EXECS
# executions or SECONDS seconds, whichever comes first, then prints its counts.
#
#   fuzz/run.sh TARGET [SECONDS] [EXECS]        (defaults 1800 10000000)
#
# Needs `cargo install cargo-afl` once. Findings land in fuzz/out/TARGET; copy a crash
# to fuzz/regressions/TARGET/ so tests/fuzz_replay.rs keeps replaying it.
set -euo pipefail
cd "$(dirname "$0")"
T=${1:?target}
SECS=${2:-1800}
EXECS=${3:-10000000}
cargo afl build --release --bin "$T" >/dev/null
mkdir -p out
export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1 AFL_QUIET=1
cargo afl fuzz -i "corpus/$T" -o "out/$T" -V "$SECS" -E "$EXECS" "target/release/$T" >"out/$T.log" 2>&1 || true
s=out/$T/default/fuzzer_stats
printf '%s: execs=%s time=%ss crashes=%s hangs=%s corpus=%s\n' "$T" \
  "$(awk '/^execs_done/{print $3}' "$s")" "$(awk '/^run_time/{print $3}' "$s")" \
  "$(awk '/^saved_crashes/{print $3}' "$s")" "$(awk '/^saved_hangs/{print $3}' "$s")" \
  "$(awk '/^corpus_count/{print $3}' "$s")"
