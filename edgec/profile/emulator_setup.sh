#!/usr/bin/env bash
# Sets up the emulated arm64 devices of targets/devices.toml (emulated-a53, emulated-a76):
#
#   ROOT/rootfs/            arm64 Debian bookworm userland with python3 (mmdebstrap, extract only)
#   ROOT/rootfs/opt/site/   aarch64 wheels of the pinned runtimes (pip --target, constraints.txt)
#   ROOT/cortex-a53/, ROOT/cortex-a76/
#                           one qemu -L root per CPU model: the userland's folders linked, plus a
#                           /proc/cpuinfo of that core (qemu shows the guest the host's x86 one,
#                           which crashes onnxruntime's CPU detection and disables XNNPACK)
#   ROOT/plugin/libinsn_count.so
#                           qemu TCG plugin counting instructions (edgec/profile/insn_count.c),
#                           built against qemu-plugin.h of the installed qemu's Debian source
#   ROOT/READY              written last, with the versions the counts depend on
#
# Each step is skipped when its result is already there, so running it again is cheap.
#
# usage: emulator_setup.sh [--optional] [--sshd] ROOT PYTHON CONSTRAINTS
#   PYTHON       a Python 3.11 with pip (downloads the aarch64 wheels)
#   --optional   if the host tools are missing and cannot be installed here (no apt-get, not
#                root), say so and exit 0: the tests that need the emulator skip
#   --sshd       also install openssh-server (the SSH device tests start their own sshd)
set -euo pipefail

OPTIONAL=0
PACKAGES=(qemu-user mmdebstrap gcc pkg-config libglib2.0-dev xz-utils)
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --optional) OPTIONAL=1 ;;
    --sshd) PACKAGES+=(openssh-server) ;;
    *) echo "emulator_setup.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
if [[ $# -ne 3 ]]; then
  echo "usage: emulator_setup.sh [--optional] [--sshd] ROOT PYTHON CONSTRAINTS" >&2
  exit 2
fi
ROOT=$(realpath -m "$1")
PYTHON=$2
CONSTRAINTS=$(realpath "$3")
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SUITE=bookworm
CPUS=(cortex-a53 cortex-a76)
RUNTIMES=(onnxruntime ai-edge-litert numpy)
START=$SECONDS

step() { printf '[arm-emulator %3ds] %s\n' $((SECONDS - START)) "$*"; }

missing_packages() {
  local p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || echo "$p"
  done
}

install_host_packages() {
  local missing
  if command -v dpkg-query >/dev/null; then
    mapfile -t missing < <(missing_packages)
  else
    missing=("${PACKAGES[@]}")
  fi
  [[ ${#missing[@]} -eq 0 ]] && return 0
  if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
    echo "The emulated arm64 devices need these Debian packages: ${missing[*]}." >&2
    echo "Install them (apt-get install ${missing[*]}) and run this again." >&2
    [[ $OPTIONAL -eq 1 ]] && { echo "Skipping the emulator set-up: its tests will skip." >&2; exit 0; }
    exit 1
  fi
  step "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

make_rootfs() {
  if [[ -x $ROOT/rootfs/usr/bin/python3 ]]; then return 0; fi
  step "arm64 $SUITE userland with python3 (mmdebstrap)"
  rm -rf "$ROOT/rootfs.partial"
  mmdebstrap --quiet --variant=extract --architectures=arm64 \
    --include=python3,libstdc++6,ca-certificates "$SUITE" "$ROOT/rootfs.partial"
  # Byte-compiled stdlib saves seconds of emulated start-up on every run.
  if "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    "$PYTHON" -m compileall -q -s "$ROOT/rootfs.partial" -p / "$ROOT/rootfs.partial/usr/lib/python3.11" || true
  fi
  mv "$ROOT/rootfs.partial" "$ROOT/rootfs"
}

# The runtime versions constraints.txt pins: instruction counts change with them.
pins() { grep -iE "^($(IFS='|'; echo "${RUNTIMES[*]}"))==" "$CONSTRAINTS" | sort; }

install_runtimes() {
  local site=$ROOT/rootfs/opt/site wanted
  wanted=$(pins)
  if [[ -f $site/.pins && $(cat "$site/.pins") == "$wanted" ]]; then return 0; fi
  step "aarch64 wheels: $(echo $wanted)"
  rm -rf "$site.partial"
  "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-warn-conflicts \
    --target "$site.partial" -c "$CONSTRAINTS" --only-binary=:all: \
    --python-version 3.11 --implementation cp --abi cp311 \
    --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 \
    --platform manylinux_2_27_aarch64 --platform manylinux_2_28_aarch64 "${RUNTIMES[@]}"
  echo "$wanted" > "$site.partial/.pins"
  rm -rf "$site"
  mv "$site.partial" "$site"
}

# cpuinfo CPU PART VARIANT REVISION FEATURES: one entry per CPU the host has (the guest sees the
# host's /sys/devices/system/cpu, and the CPU detection expects both to agree).
cpuinfo() {
  local cpu=$1 part=$2 variant=$3 revision=$4 features=$5 i count
  count=$(getconf _NPROCESSORS_CONF)
  mkdir -p "$ROOT/$cpu/proc"
  for ((i = 0; i < count; i++)); do
    printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: %s\nCPU implementer\t: 0x41\n' "$i" "$features"
    printf 'CPU architecture: 8\nCPU variant\t: %s\nCPU part\t: %s\nCPU revision\t: %s\n\n' "$variant" "$part" "$revision"
  done > "$ROOT/$cpu/proc/cpuinfo"
}

make_cpu_roots() {
  local cpu entry
  step "qemu roots for ${CPUS[*]}"
  for cpu in "${CPUS[@]}"; do
    mkdir -p "$ROOT/$cpu"
    for entry in "$ROOT"/rootfs/*; do
      case ${entry##*/} in dev | proc | sys | tmp) continue ;; esac
      ln -sfn "../rootfs/${entry##*/}" "$ROOT/$cpu/${entry##*/}"
    done
  done
  # Features as Linux reports them for each core; A76 adds dot product (asimddp) among others.
  cpuinfo cortex-a53 0xd03 0x0 4 "fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid"
  cpuinfo cortex-a76 0xd0b 0x4 1 \
    "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"
}

# qemu-plugin.h from the Debian source package of the installed qemu: Debian ships no plugin
# header, and a plugin must be built against its qemu's own.
plugin_header() {
  local src=$ROOT/src version apt_options
  [[ -f $ROOT/plugin/include/qemu-plugin.h ]] && return 0
  version=$(dpkg-query -W -f='${source:Version}' qemu-user)
  step "qemu-plugin.h from the qemu $version source package"
  rm -rf "$src" && mkdir -p "$src/lists/partial" "$src/cache/archives/partial" "$ROOT/plugin/include"
  sed -n 's/^deb /deb-src /p' "$ROOT/rootfs/etc/apt/sources.list" > "$src/sources.list"
  apt_options=(-qq -o "Dir::Etc::SourceList=$src/sources.list" -o Dir::Etc::SourceParts=/nonexistent
    -o "Dir::State::Lists=$src/lists" -o "Dir::Cache=$src/cache" -o APT::Sandbox::User=root)
  apt-get "${apt_options[@]}" update
  (cd "$src" && { apt-get "${apt_options[@]}" source --download-only "qemu=$version" \
    || apt-get "${apt_options[@]}" source --download-only qemu; })
  tar -xJf "$src"/qemu_*.orig.tar.xz -C "$src" --wildcards '*/include/qemu/qemu-plugin.h'
  cp "$src"/qemu-*/include/qemu/qemu-plugin.h "$ROOT/plugin/include/"
  rm -rf "$src"
}

build_plugin() {
  local lib=$ROOT/plugin/libinsn_count.so
  if [[ -f $lib && $lib -nt $HERE/insn_count.c ]]; then return 0; fi
  plugin_header
  step "instruction-count plugin"
  # shellcheck disable=SC2046  # pkg-config prints several flags
  gcc -shared -fPIC -O2 -Wall -Werror $(pkg-config --cflags glib-2.0) -I "$ROOT/plugin/include" \
    -o "$lib.partial" "$HERE/insn_count.c"
  mv "$lib.partial" "$lib"
}

smoke_test() {
  local cpu marks
  for cpu in "${CPUS[@]}"; do
    step "checking $cpu: runtimes import, plugin counts"
    marks=$(mktemp)
    QEMU_CPU=$cpu PYTHONPATH=/opt/site qemu-aarch64 -L "$ROOT/$cpu" \
      -plugin "$ROOT/plugin/libinsn_count.so,out=$marks" "$ROOT/$cpu/usr/bin/python3" -c \
      'import os, onnxruntime, ai_edge_litert.interpreter, numpy
try: os.close(0x7EDC0DE)
except OSError: pass'
    [[ $(wc -l < "$marks") -eq 1 ]] || { echo "the plugin recorded no mark on $cpu" >&2; exit 1; }
    rm -f "$marks"
  done
}

ready_record() {
  qemu-aarch64 --version | head -1
  pins
  echo "cpus: ${CPUS[*]}"
}

install_host_packages
if [[ -f $ROOT/READY && $(cat "$ROOT/READY") == "$(ready_record)" && $ROOT/plugin/libinsn_count.so -nt $HERE/insn_count.c ]]; then
  make_cpu_roots
  step "already set up: $ROOT"
  exit 0
fi
mkdir -p "$ROOT"
rm -f "$ROOT/READY"
make_rootfs
install_runtimes
make_cpu_roots
build_plugin
smoke_test
ready_record > "$ROOT/READY"
step "ready: $ROOT (emulated-a53, emulated-a76 in targets/devices.toml)"
