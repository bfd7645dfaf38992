#!/bin/sh
# A private CA and a server certificate for the desktop's TLS ports (docker-compose.tls.yml, or a
# RabbitMQ/Redis of your own), with openssl. Run on the desktop:
#
#   sh scripts/make-certs.sh desktop.lan 192.168.1.20     # every name/IP the laptop will use
#
# Writes into SECRETS_DIR (default ./secrets, the folder compose mounts secrets from):
#   tls_ca.pem    the CA certificate: copy it to the laptop (TP_AMQP_CA_FILE, TP_REDIS_CA_FILE)
#   tls_cert.pem  the server certificate (subjectAltName: the names and IPs given, localhost,
#                 127.0.0.1), valid DAYS days (default 825)
#   tls_key.pem   its private key
#   tls_ca.key    the CA's private key: keep it off the laptop; needed only to issue again
# An existing CA is reused (the laptop keeps trusting it); the server certificate is replaced.
# Clients verify the server's certificate and host name; they authenticate with passwords.
set -eu
cd "$(dirname "$0")/.."
if [ $# -eq 0 ]; then
    sed -n '2,/^set -eu/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
fi
command -v openssl >/dev/null || { echo "make-certs: openssl not installed" >&2; exit 1; }
# SECRETS_DIR from the environment, else from .env (where compose reads it), else ./secrets.
if [ -z "${SECRETS_DIR:-}" ] && [ -f .env ]; then
    SECRETS_DIR=$(sed -n 's/^SECRETS_DIR=//p' .env | tail -n 1)
fi
dir=${SECRETS_DIR:-./secrets}
days=${DAYS:-825}
umask 077
mkdir -p "$dir"
[ -f "$dir/.gitignore" ] || printf '*\n' >"$dir/.gitignore"

san="DNS:localhost,IP:127.0.0.1"
for name in "$@"; do
    case $name in
        *[!0-9.]* | '') case $name in *:*) san="$san,IP:$name" ;; *) san="$san,DNS:$name" ;; esac ;;
        *) san="$san,IP:$name" ;;
    esac
done

if [ ! -s "$dir/tls_ca.pem" ] || [ ! -s "$dir/tls_ca.key" ]; then
    openssl req -x509 -newkey rsa:3072 -nodes -days 3650 -subj "/CN=tradeplat private CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -keyout "$dir/tls_ca.key" -out "$dir/tls_ca.pem" 2>/dev/null
    echo "created $dir/tls_ca.pem (and its key tls_ca.key)"
else
    echo "kept    $dir/tls_ca.pem"
fi

ext=$(mktemp)
csr=$(mktemp)
trap 'rm -f "$ext" "$csr"' EXIT
printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\nbasicConstraints=critical,CA:FALSE\n' \
    "$san" >"$ext"
openssl req -new -newkey rsa:3072 -nodes -subj "/CN=$1" \
    -keyout "$dir/tls_key.pem" -out "$csr" 2>/dev/null
openssl x509 -req -in "$csr" -CA "$dir/tls_ca.pem" -CAkey "$dir/tls_ca.key" -CAcreateserial \
    -days "$days" -extfile "$ext" -out "$dir/tls_cert.pem" 2>/dev/null
rm -f "$dir/tls_ca.srl"
# Readable by the containers' users (RabbitMQ, Redis); the folder (0700) keeps others out. The
# CA's key stays 0600.
chmod 700 "$dir"
chmod 644 "$dir/tls_ca.pem" "$dir/tls_cert.pem" "$dir/tls_key.pem"
echo "created $dir/tls_cert.pem for $san (valid $days days)"
