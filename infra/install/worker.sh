#!/usr/bin/env bash
# Installs kiln-worker on a GPU box: its user, folders, binary, systemd unit, config and secrets,
# checks that a GPU and a Vulkan driver are there (and says what to install when not), then runs
# `kiln-worker doctor` and starts the service.
#
#   sudo infra/install/worker.sh --binary ./kiln-worker --name gpu-box-1 \
#       --scheduler-url http://sched:7878 --amqp-url 'amqp://gpu-box-1:PASSWORD@broker:5672/%2f' \
#       --token kiln_…          # or KILN_WORKER_TOKEN in the environment
#
# `kiln worker add gpu-box-1` (on a machine with the operator token) prints the token, the broker
# password and the rabbitmqctl lines for this box. Run again to upgrade: the binary and the unit
# are replaced, /etc/kiln/worker.toml is kept, the secrets are rewritten only when given.
#
# Options:
#   --binary PATH         the kiln-worker to install [./kiln-worker]
#   --name NAME           this worker's id and broker user [the host name]
#   --scheduler-url URL   the scheduler, for asset uploads (required for a new config)
#   --amqp-url URL        the broker with this box's login (written to worker.env, mode 0600)
#   --token TOKEN         this box's worker token (written to worker.env; or KILN_WORKER_TOKEN)
#   --tiers LIST          tiers to serve, comma separated [all]
#   --metrics-listen ADDR serve /metrics and /healthz for Prometheus, e.g. 0.0.0.0:9464 [off]
#   --root DIR            install under DIR (a package or image build, a test): no user is made,
#                         systemd is not touched and the doctor does not run
#   --no-start            install, but leave the service stopped
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
binary=./kiln-worker name="$(hostname)" scheduler_url="" amqp_url="" token="${KILN_WORKER_TOKEN:-}"
tiers="" metrics_listen="" root="" start=1

die() { echo "worker.sh: $*" >&2; exit 2; }
say() { echo "==> $*"; }
warn() { echo "warning: $*" >&2; }

while (($#)); do
  case "$1" in
    --binary) binary="${2:?--binary needs a path}"; shift 2 ;;
    --name) name="${2:?--name needs a name}"; shift 2 ;;
    --scheduler-url) scheduler_url="${2:?--scheduler-url needs a URL}"; shift 2 ;;
    --amqp-url) amqp_url="${2:?--amqp-url needs a URL}"; shift 2 ;;
    --token) token="${2:?--token needs a token}"; shift 2 ;;
    --tiers) tiers="${2:?--tiers needs a list}"; shift 2 ;;
    --metrics-listen) metrics_listen="${2:?--metrics-listen needs an address}"; shift 2 ;;
    --root) root="${2:?--root needs a folder}"; shift 2 ;;
    --no-start) start=0; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

[[ -x "$binary" ]] || die "--binary $binary is not an executable kiln-worker"
[[ "$name" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || die "--name $name: letters, digits, '.', '_' and '-' only"
[[ -n "$root" || $EUID -eq 0 ]] || die "run as root (or with --root DIR)"
etc="$root/etc/kiln" state="$root/var/lib/kiln-worker" units="$root/etc/systemd/system"

say "user kiln-worker"
if [[ -z "$root" ]] && ! id kiln-worker >/dev/null 2>&1; then
  groups=$(for g in video render; do getent group "$g" >/dev/null && printf '%s,' "$g"; done)
  useradd --system --home-dir /var/lib/kiln-worker --shell /usr/sbin/nologin ${groups:+--groups "${groups%,}"} kiln-worker
fi

say "folders, binary and unit"
install -d -m 0755 "$root/usr/local/bin" "$units" "$etc"
install -d -m 0750 "$state"
[[ -z "$root" ]] && chown kiln-worker:kiln-worker "$state"
install -m 0755 "$binary" "$root/usr/local/bin/kiln-worker"
install -m 0644 "$here/systemd/kiln-worker.service" "$units/kiln-worker.service"

if [[ -f "$etc/worker.toml" ]]; then
  say "keeping $etc/worker.toml"
else
  [[ -n "$scheduler_url" ]] || die "--scheduler-url is required for a new config"
  say "config $etc/worker.toml"
  # The example, with this box's settings; the broker URL (it holds a password) goes to worker.env.
  sed -e "s|^amqp_url = .*|# amqp_url: in /etc/kiln/worker.env (KILN_AMQP_URL), with its password|" \
      -e "s|^scheduler_url = .*|scheduler_url = \"$scheduler_url\"|" \
      -e "s|^# worker_id = .*|worker_id = \"$name\"|" \
      ${tiers:+-e "s|^# tiers = .*|tiers = [$(sed 's/[^,][^,]*/"&"/g; s/,/, /g' <<<"$tiers")]|"} \
      ${metrics_listen:+-e "s|^# metrics_listen = .*|metrics_listen = \"$metrics_listen\"|"} \
      "$here/config/worker.toml" >"$etc/worker.toml"
  chmod 0644 "$etc/worker.toml"
fi

if [[ -n "$token" || -n "$amqp_url" ]]; then
  say "secrets $etc/worker.env (0600)"
  [[ -n "$token" && -n "$amqp_url" ]] || die "give both --token and --amqp-url (or neither, to keep worker.env)"
  umask 077
  printf 'KILN_WORKER_TOKEN=%s\nKILN_AMQP_URL=%s\n' "$token" "$amqp_url" >"$etc/worker.env"
  chmod 0600 "$etc/worker.env"
elif [[ ! -f "$etc/worker.env" ]]; then
  die "no $etc/worker.env yet: give --token and --amqp-url"
fi

say "GPU and Vulkan"
gpu_ok=1
if ls /dev/nvidia0 >/dev/null 2>&1; then
  echo "GPU: NVIDIA ($(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo /dev/nvidia0))"
elif ls /dev/dri/renderD* >/dev/null 2>&1; then
  echo "GPU: a DRM render node ($(ls /dev/dri/renderD* | head -n1))"
else
  gpu_ok=0
  warn "no GPU device (/dev/nvidia0, /dev/dri/renderD*): the worker will render on the CPU. Install the GPU's"
  warn "  driver: NVIDIA: apt install nvidia-driver (non-free); AMD or Intel: the kernel's amdgpu or i915"
fi
if ! ldconfig -p 2>/dev/null | grep -q 'libvulkan\.so\.1'; then
  gpu_ok=0
  warn "no Vulkan loader (libvulkan.so.1): apt install libvulkan1"
fi
icds=$(compgen -G '/usr/share/vulkan/icd.d/*.json'; compgen -G '/etc/vulkan/icd.d/*.json') || true
if [[ -z "$icds" ]]; then
  gpu_ok=0
  warn "no Vulkan driver (ICD): NVIDIA: apt install nvidia-vulkan-icd; AMD or Intel: apt install mesa-vulkan-drivers"
elif ! grep -qv '/lvp_icd' <<<"$icds"; then
  gpu_ok=0
  warn "only Mesa's software Vulkan (lavapipe): a GPU's own driver renders far faster (NVIDIA: nvidia-vulkan-icd)"
fi
((gpu_ok)) && echo "Vulkan: loader and driver present"

if [[ -n "$root" ]]; then
  say "installed under $root; the doctor and systemd are left to the target"
  exit 0
fi

say "kiln-worker doctor"
set -a; . /etc/kiln/worker.env; set +a
if ! runuser -u kiln-worker -- /usr/local/bin/kiln-worker --config /etc/kiln/worker.toml --data-dir /var/lib/kiln-worker doctor; then
  warn "the doctor found a problem (above); fix it, then: systemctl restart kiln-worker"
fi

systemctl daemon-reload
if ((start)); then
  systemctl enable --now kiln-worker
  say "started: systemctl status kiln-worker; journalctl -u kiln-worker -f"
else
  systemctl enable kiln-worker
  say "installed, not started: systemctl start kiln-worker"
fi
