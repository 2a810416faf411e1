#!/bin/sh
# Usage: ./generate.sh HOST[:PORT]  (TailGuard's public address)
# Writes config/wg0.conf (TailGuard's) and peer.conf (the other side's).
set -eu
[ $# -eq 1 ] || { echo "usage: $0 HOST[:PORT]  (TailGuard's public address)" >&2; exit 2; }
exec "$(dirname "$0")/../wg-pair.sh" tailnet-exit "$(dirname "$0")" "$1"
