#!/usr/bin/env bash
# Installs kiln-edge on a Raspberry Pi (Raspberry Pi OS, aarch64): its user in `dialout` (serial
# Modbus adapters), folders, binary, systemd unit, config and credentials.
#
#   sudo infra/install/pi.sh --binary ./kiln-edge --name studio-pi \
#       --mqtt-url mqtt://192.168.1.10:1883 --scheduler-url http://192.168.1.10:7878 \
#       --token kiln_… --mqtt-password …
#
# `kiln device add studio-pi --devices printer-1,camera-1` (with the operator token) prints the
# device token, the MQTT password and the broker's lines for this Pi. A new /etc/kiln/edge.toml is
# the example with these settings: edit its [[device]] entries for the devices beside this Pi,
# then start it. Run again to upgrade: the binary and the unit are replaced, the config is kept,
# the credentials are rewritten only when given.
#
# Options:
#   --binary PATH         the kiln-edge to install [./kiln-edge]
#   --name NAME           this Pi's MQTT user, as given to `kiln device add` [the host name]
#   --mqtt-url URL        the fleet's broker (mqtts:// over TLS); required for a new config
#   --scheduler-url URL   the scheduler's API, for assets and photos; required for a new config
#   --token TOKEN         the device token (written to edge.env, mode 0600; or KILN_EDGE_TOKEN)
#   --mqtt-password PW    the Pi's MQTT password (edge.env; or KILN_EDGE_MQTT_PASSWORD)
#   --root DIR            install under DIR (an image build, a test): no user, systemd untouched
#   --start               start the service now (by default it is enabled, to start once the
#                         config's devices are right)
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
binary=./kiln-edge name="$(hostname)" mqtt_url="" scheduler_url="" root="" start=0
token="${KILN_EDGE_TOKEN:-}" password="${KILN_EDGE_MQTT_PASSWORD:-}"

die() { echo "pi.sh: $*" >&2; exit 2; }
say() { echo "==> $*"; }

while (($#)); do
  case "$1" in
    --binary) binary="${2:?--binary needs a path}"; shift 2 ;;
    --name) name="${2:?--name needs a name}"; shift 2 ;;
    --mqtt-url) mqtt_url="${2:?--mqtt-url needs a URL}"; shift 2 ;;
    --scheduler-url) scheduler_url="${2:?--scheduler-url needs a URL}"; shift 2 ;;
    --token) token="${2:?--token needs a token}"; shift 2 ;;
    --mqtt-password) password="${2:?--mqtt-password needs a password}"; shift 2 ;;
    --root) root="${2:?--root needs a folder}"; shift 2 ;;
    --start) start=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

[[ -x "$binary" ]] || die "--binary $binary is not an executable kiln-edge"
[[ "$name" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || die "--name $name: letters, digits, '.', '_' and '-' only"
[[ -n "$root" || $EUID -eq 0 ]] || die "run as root (or with --root DIR)"
if [[ -z "$root" && "$(uname -m)" != "aarch64" ]]; then
  echo "note: this is $(uname -m), not a 64-bit Pi (aarch64); the binary must be built for it" >&2
fi
etc="$root/etc/kiln" state="$root/var/lib/kiln-edge" units="$root/etc/systemd/system"

say "user kiln (in dialout)"
if [[ -z "$root" ]] && ! id kiln >/dev/null 2>&1; then
  useradd --system --user-group --groups dialout --home-dir /var/lib/kiln-edge --shell /usr/sbin/nologin kiln
fi

say "folders, binary and unit"
install -d -m 0755 "$root/usr/local/bin" "$units" "$etc"
install -d -m 0750 "$state"
[[ -z "$root" ]] && chown kiln:kiln "$state"
install -m 0755 "$binary" "$root/usr/local/bin/kiln-edge"
install -m 0644 "$here/systemd/kiln-edge.service" "$units/kiln-edge.service"

if [[ -f "$etc/edge.toml" ]]; then
  say "keeping $etc/edge.toml"
else
  [[ -n "$mqtt_url" && -n "$scheduler_url" ]] || die "--mqtt-url and --scheduler-url are required for a new config"
  say "config $etc/edge.toml (edit its [[device]] entries)"
  # The example with this Pi's settings; the token (a secret) goes to edge.env.
  awk -v mqtt="$mqtt_url" -v user="$name" -v sched="$scheduler_url" '
    /^\[/ { section = $0 }
    section == "[mqtt]" && /^url = / { print "url = \"" mqtt "\""; next }
    section == "[mqtt]" && /^username = / { print "username = \"" user "\""; next }
    section == "[scheduler]" && /^url = / { print "url = \"" sched "\""; next }
    section == "[scheduler]" && /^token = / { print "# token: in /etc/kiln/edge.env (KILN_EDGE_TOKEN)"; next }
    { print }' "$here/config/edge.toml" >"$etc/edge.toml"
  chmod 0644 "$etc/edge.toml"
fi

if [[ -n "$token" || -n "$password" ]]; then
  [[ -n "$token" && -n "$password" ]] || die "give both --token and --mqtt-password (or neither, to keep edge.env)"
  say "credentials $etc/edge.env (0600)"
  umask 077
  printf 'KILN_EDGE_TOKEN=%s\nKILN_EDGE_MQTT_PASSWORD=%s\n' "$token" "$password" >"$etc/edge.env"
  chmod 0600 "$etc/edge.env"
elif [[ ! -f "$etc/edge.env" ]]; then
  die "no $etc/edge.env yet: give --token and --mqtt-password"
fi

if [[ -n "$root" ]]; then
  say "installed under $root; systemd is left to the target"
  exit 0
fi
say "checking the config"
set -a; . /etc/kiln/edge.env; set +a
/usr/local/bin/kiln-edge --config /etc/kiln/edge.toml --print-config >/dev/null
systemctl daemon-reload
if ((start)); then
  systemctl enable --now kiln-edge
  say "started: systemctl status kiln-edge; journalctl -u kiln-edge -f"
else
  systemctl enable kiln-edge
  say "enabled; edit /etc/kiln/edge.toml's devices, then: systemctl start kiln-edge"
fi
