#!/usr/bin/env bash
# Make sure the local Redis (6379) and RabbitMQ (5672) are up; start them if they are not.
# These are the machine's shared servers (Debian packages); tests never stop them.
set -euo pipefail

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if ! listening 6379; then
  echo "starting redis-server"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi
if ! listening 5672; then
  echo "starting rabbitmq-server"
  rabbitmq-server -detached
fi
for _ in $(seq 1 120); do
  if listening 6379 && listening 5672; then
    echo "redis and rabbitmq are up"
    exit 0
  fi
  sleep 1
done
echo "redis or rabbitmq did not come up" >&2
exit 1
