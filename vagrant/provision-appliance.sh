#!/bin/sh
# The appliance listens on the private network; the agents dial ws://192.168.56.10:7700.
set -eu
mkdir -p /srv/blocksnap
cd /vagrant && node dist/appliance/cli.js --help >/dev/null
echo "start: node /vagrant/dist/appliance/cli.js serve --data /srv/blocksnap --listen 192.168.56.10:7700 (see README)"
