#!/bin/sh
# Container entrypoint for Redis: write the ACL file from the docker secret, then exec
# redis-server with it. The default user is off, so every client authenticates as the platform
# user, which may touch only the namespace's keys (<ns>:*, Optuna's journal included: it lives
# under <ns>:hyperopt:) and channels, with every command but the admin and dangerous ones
# (CONFIG, FLUSHALL, KEYS, SHUTDOWN, DEBUG, MONITOR...), nor FUNCTION and SCRIPT FLUSH (they
# change server-wide state). Scripts (EVAL, EVALSHA, SCRIPT LOAD) stay allowed: the status
# store's state changes are Lua scripts. SCAN and DBSIZE still see other key names: give the
# platform a Redis (or at least a database) of its own.
#
# The ACL file keeps only the password's SHA-256 (#<hex>), never the password.
# Extra arguments are passed to redis-server after the config file, so they win (a test adds
# --port, --dir and --bind).
#
# Environment (defaults for the container; a test overrides the paths):
#   REDIS_SECRETS_DIR  folder with tp_redis_password (/run/secrets)
#   REDIS_ACL_DIR      where the ACL file goes (/run/redis-acl, a tmpfs in compose)
#   REDIS_CONF         the config file (/usr/local/etc/redis/redis.conf)
#   REDIS_PLATFORM_USER  the platform's user (tradeplat)
#   TP_NAMESPACE       the platform's namespace, prefix of every key (tp)
#   REDIS_TLS_DIR      set (docker-compose.tls.yml): a TLS port as well, with tls_ca.pem, tls_cert.pem
#                      and tls_key.pem from this folder (scripts/make-certs.sh); clients verify the
#                      server, the server does not ask clients for certificates (passwords do)
#   REDIS_TLS_PORT     that port (6380)
set -eu

secrets_dir=${REDIS_SECRETS_DIR:-/run/secrets}
acl_dir=${REDIS_ACL_DIR:-/run/redis-acl}
conf=${REDIS_CONF:-/usr/local/etc/redis/redis.conf}
user=${REDIS_PLATFORM_USER:-tradeplat}
namespace=${TP_NAMESPACE:-tp}

case $namespace in
    '' | *[!a-z0-9_-]*)
        echo "redis-entrypoint: TP_NAMESPACE must match [a-z][a-z0-9_-]*" >&2
        exit 1
        ;;
esac
if [ ! -s "$secrets_dir/tp_redis_password" ]; then
    echo "redis-entrypoint: secret file $secrets_dir/tp_redis_password is missing or empty" >&2
    exit 1
fi
# printf, not echo: the hash must cover the password without a newline (as AUTH sends it).
hash=$(printf '%s' "$(cat "$secrets_dir/tp_redis_password")" | sha256sum | cut -d' ' -f1)

umask 077
mkdir -p "$acl_dir"
acl="$acl_dir/users.acl"
{
    echo "user default off resetpass resetkeys resetchannels -@all"
    echo "user $user on #$hash resetkeys ~$namespace:* resetchannels &$namespace:* +@all -@admin -@dangerous -function -script|flush"
} >"$acl"
echo "redis-entrypoint: wrote $acl (user $user, keys $namespace:*)"

if [ -n "${REDIS_TLS_DIR:-}" ]; then
    for f in tls_ca.pem tls_cert.pem tls_key.pem; do
        if [ ! -r "$REDIS_TLS_DIR/$f" ]; then
            echo "redis-entrypoint: $REDIS_TLS_DIR/$f is missing or unreadable" >&2
            exit 1
        fi
    done
    set -- --tls-port "${REDIS_TLS_PORT:-6380}" \
        --tls-ca-cert-file "$REDIS_TLS_DIR/tls_ca.pem" \
        --tls-cert-file "$REDIS_TLS_DIR/tls_cert.pem" \
        --tls-key-file "$REDIS_TLS_DIR/tls_key.pem" \
        --tls-auth-clients no --tls-protocols "TLSv1.2 TLSv1.3" "$@"
    echo "redis-entrypoint: TLS on port ${REDIS_TLS_PORT:-6380}"
fi

exec redis-server "$conf" --aclfile "$acl" "$@"
