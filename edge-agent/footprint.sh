#!/usr/bin/env bash
# kiln-edge's footprint on this machine, and a try at the Pi's target:
#   - the stripped binary's size (`--profile edge`: opt-level s, LTO, panic=abort, stripped), and
#   - its idle RSS with three devices configured (printer, camera, display), connected to the MQTT
#     broker at KILN_TEST_MQTT_URL (default the local Mosquitto), median of three runs.
# Aims (issue 5): at most 6 MB and 10 MB. Then builds for aarch64-unknown-linux-gnu if that target
# and Debian's gcc-aarch64-linux-gnu are installed, and prints that binary's size too.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}/edge-footprint"
cargo build -q --profile edge -p kiln-edge --target-dir "$target"
bin="$target/edge/kiln-edge"
size=$(stat -c %s "$bin")
printf 'kiln-edge x86_64 stripped binary: %d bytes (%.2f MB)\n' "$size" "$(echo "$size / 1048576" | bc -l)"

mqtt="${KILN_TEST_MQTT_URL:-mqtt://127.0.0.1:1883}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/edge.toml" <<TOML
data_dir = "$work/data"
[mqtt]
url = "$mqtt"
prefix = "footprint-$$"
[scheduler]
url = "http://127.0.0.1:9"
token = "unused"
[[device]]
id = "printer"
kind = "printer"
modbus = { address = "127.0.0.1:9" }
folder = "$work/tray"
[[device]]
id = "camera"
kind = "camera"
command = ["true", "{out}"]
[[device]]
id = "display"
kind = "display"
folder = "$work/gallery"
TOML
rss=()
for run in 1 2 3; do
  KILN_LOG=error "$bin" --config "$work/edge.toml" &
  pid=$!
  sleep 8
  rss+=("$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status")")
  kill "$pid"; wait "$pid" || true
done
median=$(printf '%s\n' "${rss[@]}" | sort -n | sed -n 2p)
printf 'kiln-edge idle RSS, 3 devices, after 8 s: runs %s kB; median %d kB (%.2f MB)\n' \
  "${rss[*]}" "$median" "$(echo "$median / 1024" | bc -l)"

if rustup target list --installed 2>/dev/null | grep -q aarch64-unknown-linux-gnu && command -v aarch64-linux-gnu-gcc >/dev/null; then
  CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
    cargo build -q --profile edge -p kiln-edge --target aarch64-unknown-linux-gnu --target-dir "$target"
  abin="$target/aarch64-unknown-linux-gnu/edge/kiln-edge"
  asize=$(stat -c %s "$abin")
  printf 'kiln-edge aarch64 stripped binary: %d bytes (%.2f MB): %s\n' "$asize" "$(echo "$asize / 1048576" | bc -l)" "$(file -b "$abin" | cut -d, -f1-2)"
else
  echo "aarch64: skipped (rustup target add aarch64-unknown-linux-gnu; apt-get install gcc-aarch64-linux-gnu)"
fi
