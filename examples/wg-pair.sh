#!/bin/sh
# Writes DIR/config/wg0.conf (TailGuard's) and DIR/peer.conf (the other
# WireGuard host's) for PATTERN, with fresh keys, using only the image
# (`tailguard wg-pair`). Each example's generate.sh calls it.
# Usage: wg-pair.sh PATTERN DIR HOST[:PORT]
set -eu
if [ $# -ne 3 ]; then
  echo "usage: $0 PATTERN DIR HOST[:PORT]" >&2
  exit 2
fi
pattern=$1
cd "$2"
mkdir -p config
docker run --rm --user "$(id -u):$(id -g)" -v "$PWD:/out" --entrypoint tailguard \
  "${TAILGUARD_IMAGE:-tailguard:latest}" wg-pair "$pattern" --endpoint "$3" --out /out/pair
mv pair/wg0.conf config/wg0.conf
mv pair/peer.conf peer.conf
rmdir pair
echo "config/wg0.conf is TailGuard's; import peer.conf on the other WireGuard host."
