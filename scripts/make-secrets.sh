#!/bin/sh
# Create the random secret files docker-compose.yml mounts (see .env.example), in SECRETS_DIR
# (default ./secrets). Existing files are kept, so running it again never changes a password
# that a service has already stored. Hex values: safe in URLs, rabbitmq.conf and ACL files.
set -eu
cd "$(dirname "$0")/.."
# SECRETS_DIR from the environment, else from .env (where compose reads it), else ./secrets.
if [ -z "${SECRETS_DIR:-}" ] && [ -f .env ]; then
    SECRETS_DIR=$(sed -n 's/^SECRETS_DIR=//p' .env | tail -n 1)
fi
dir=${SECRETS_DIR:-./secrets}
umask 077
mkdir -p "$dir"
chmod 700 "$dir"
# Never commit a secret, whatever the repository's own .gitignore says.
[ -f "$dir/.gitignore" ] || printf '*\n' >"$dir/.gitignore"

new_secret() {
    if [ -s "$dir/$1" ]; then
        echo "kept    $dir/$1"
        return
    fi
    od -An -tx1 -N24 /dev/urandom | tr -d ' \n' >"$dir/$1"
    echo "created $dir/$1"
}

for name in tp_amqp_password tp_redis_password tp_s3_secret_access_key tp_health_token \
    rabbitmq_admin_password minio_root_password postgres_password; do
    new_secret "$name"
done
[ -s "$dir/minio_root_user" ] || printf 'tpadmin' >"$dir/minio_root_user"

# The containers run as other users than you: the files must be readable by them. The folder
# (0700) keeps other users of this machine out.
chmod 644 "$dir"/*
for name in git_deploy_key git_known_hosts; do
    if [ ! -s "$dir/$name" ]; then
        echo "missing $dir/$name: add it (git_deploy_key: the repository's read-only deploy key," >&2
        echo "        install -m 0644 KEY $dir/git_deploy_key so the containers can read it;" >&2
        echo "        git_known_hosts: ssh-keyscan <git host> > $dir/git_known_hosts)" >&2
    fi
done
