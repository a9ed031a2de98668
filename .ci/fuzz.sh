#!/usr/bin/env bash
# Fuzzing in CI: builds every cargo-fuzz target under fuzz/ and runs each for
# FUZZ_SECONDS (30 by default) from a fresh corpus seeded with
# fuzz/seeds/<target>. Fails on any crash, naming the input that caused it
# and the command that replays it. Needs the nightly toolchain; installs the
# pinned cargo-fuzz when it is missing.
#
#   .ci/fuzz.sh                                   # every target, 30 s each
#   FUZZ_SECONDS=600 .ci/fuzz.sh matcher event    # chosen targets, 10 min each
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.13.2
FUZZ_SECONDS=${FUZZ_SECONDS:-30}
ALL_TARGETS=(event rules_file matcher slack_response interaction_request smtp_url)
targets=("$@")
((${#targets[@]})) || targets=("${ALL_TARGETS[@]}")

log() { printf '==> %s\n' "$*"; }
die() { printf '==> FAILED: %s\n' "$*" >&2; exit 1; }

# libFuzzer's instrumentation needs nightly: no nightly is a failure, not a skip.
cargo +nightly --version >/dev/null 2>&1 ||
  die "the nightly toolchain is missing (rustup toolchain install nightly); fuzzing cannot run"

if [[ "$(cargo fuzz --version 2>/dev/null)" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]]; then
  log "installing cargo-fuzz $CARGO_FUZZ_VERSION"
  cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi

# cargo fuzz has no --locked: check that fuzz/Cargo.lock is up to date first.
cargo +nightly metadata --locked --format-version 1 --manifest-path fuzz/Cargo.toml >/dev/null ||
  die "fuzz/Cargo.lock is out of date"

log "cargo fuzz build (every target)"
cargo +nightly fuzz build

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
summary=()
failed=0
for target in "${targets[@]}"; do
  [[ -d fuzz/seeds/$target ]] || die "no seeds for target $target (fuzz/seeds/$target)"
  corpus=$work/corpus/$target
  mkdir -p "$corpus" "fuzz/artifacts/$target"
  log "fuzzing $target for $FUZZ_SECONDS s"
  # New inputs go to the temporary corpus; the committed seeds are only read.
  # -timeout: an input that takes over 25 s (on a loaded machine) is a hang.
  status=0
  cargo +nightly fuzz run "$target" "$corpus" "fuzz/seeds/$target" -- \
    -max_total_time="$FUZZ_SECONDS" -timeout=25 -print_final_stats=1 \
    >"$work/$target.log" 2>&1 || status=$?
  done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$work/$target.log" | tail -1 || true)
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/$target.log")
  speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$work/$target.log")
  units=$(sed -nE 's/.* corp: ([0-9]+)\/.*/\1/p' <<<"$done_line")
  rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$work/$target.log")
  took=$(sed -nE 's/^Done [0-9]+ runs in ([0-9]+) second.*/\1/p' "$work/$target.log")
  if ((status == 0)); then
    summary+=("$target: ${took:-?} s, ${execs:-?} execs, ${speed:-?} exec/s, corpus ${units:-?} inputs, peak RSS ${rss:-?} MB, 0 crashes")
    continue
  fi
  failed=1
  # The assertion that failed, then libFuzzer's and cargo-fuzz's last words.
  grep -m1 -A3 'panicked at' "$work/$target.log" || true
  tail -n 30 "$work/$target.log"
  artifact=$(grep -oE 'Test unit written to [^ ]+' "$work/$target.log" | tail -1 | sed 's/Test unit written to //')
  if [[ -n $artifact ]]; then
    summary+=("$target: CRASH after ${execs:-?} execs; input: $artifact")
    printf '==> %s crashed on %s\n    reproduce: cargo +nightly fuzz run %s %s\n' \
      "$target" "$artifact" "$target" "$artifact" >&2
  else
    summary+=("$target: FAILED (exit $status) without an input; see the log above")
  fi
done

log "fuzzing summary ($FUZZ_SECONDS s a target)"
printf '    %s\n' "${summary[@]}"
((failed == 0)) || die "a fuzz target crashed"
