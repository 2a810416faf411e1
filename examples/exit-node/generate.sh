#!/bin/sh
# Writes config/wg0.conf (TailGuard) and peer.conf (the other WireGuard
# host) for this pattern, with fresh keys, using only the image.
# Usage: ./generate.sh HOST[:PORT]   (the WireGuard server's public address)
set -eu
cd "$(dirname "$0")"
if [ $# -ne 1 ]; then
  echo "usage: $0 HOST[:PORT]  (the WireGuard server's public address)" >&2
  exit 2
fi
mkdir -p config
docker run --rm --user "$(id -u):$(id -g)" -v "$PWD:/out" --entrypoint tailguard \
  "${TAILGUARD_IMAGE:-tailguard:latest}" wg-pair exit-node --endpoint "$1" --out /out/pair
mv pair/wg0.conf config/wg0.conf
mv pair/peer.conf peer.conf
rmdir pair
echo "config/wg0.conf is TailGuard's; import peer.conf on the other WireGuard host."
