#!/bin/sh
# One-shot job (minio/mc image) run by docker-compose.yml once MinIO is healthy: creates the
# artifact and MLflow buckets and the platform's own MinIO user, whose policy reaches those two
# buckets only, so the services never hold MinIO's root credentials. Idempotent: safe on every
# `docker compose up`. The mc image has no cat or grep: secrets are read with `read`.
#
# Environment:
#   MINIO_INIT_SECRETS_DIR  folder with minio_root_user, minio_root_password and
#                           tp_s3_secret_access_key (/run/secrets)
#   MINIO_ENDPOINT          host:port of MinIO (minio:9000)
#   TP_S3_BUCKET, MLFLOW_BUCKET, TP_S3_ACCESS_KEY_ID  bucket names and the platform's user
set -eu

secrets=${MINIO_INIT_SECRETS_DIR:-/run/secrets}
endpoint=${MINIO_ENDPOINT:-minio:9000}
artifact_bucket=${TP_S3_BUCKET:-tradeplat-artifacts}
mlflow_bucket=${MLFLOW_BUCKET:-mlflow}
platform_user=${TP_S3_ACCESS_KEY_ID:-tradeplat}
policy=tradeplat-rw

read_secret() {
    value=
    IFS= read -r value <"$secrets/$1" || true
    if [ -z "$value" ]; then
        echo "minio-init: secret file $secrets/$1 is missing or empty" >&2
        exit 1
    fi
    printf '%s' "$value"
}

root_user=$(read_secret minio_root_user)
root_pass=$(read_secret minio_root_password)
platform_secret=$(read_secret tp_s3_secret_access_key)
# Credentials through mc's environment alias, not its command line.
export "MC_HOST_local=http://$root_user:$root_pass@$endpoint"

mc mb --ignore-existing "local/$artifact_bucket"
mc mb --ignore-existing "local/$mlflow_bucket"

policy_file=/tmp/$policy.json
cat_policy() {
    printf '{"Version":"2012-10-17","Statement":['
    printf '{"Effect":"Allow","Action":["s3:GetBucketLocation","s3:ListBucket",'
    printf '"s3:ListBucketMultipartUploads"],'
    printf '"Resource":["arn:aws:s3:::%s","arn:aws:s3:::%s"]},' "$artifact_bucket" "$mlflow_bucket"
    printf '{"Effect":"Allow","Action":["s3:GetObject","s3:PutObject","s3:DeleteObject",'
    printf '"s3:AbortMultipartUpload","s3:ListMultipartUploadParts"],'
    printf '"Resource":["arn:aws:s3:::%s/*","arn:aws:s3:::%s/*"]}]}\n' "$artifact_bucket" "$mlflow_bucket"
}
cat_policy >"$policy_file"
mc admin policy create local "$policy" "$policy_file"
# The secret key is an argument here: mc takes it no other way without a terminal. This
# container lives for seconds and shares its process list with nobody.
mc admin user add local "$platform_user" "$platform_secret" >/dev/null
if ! mc admin policy attach local "$policy" --user "$platform_user" 2>/dev/null; then
    # Attaching twice fails ("already in effect"): fine if the policy is attached.
    info=$(mc admin user info local "$platform_user")
    case $info in
        *"$policy"*) ;;
        *)
            echo "minio-init: could not attach $policy to $platform_user" >&2
            exit 1
            ;;
    esac
fi
echo "minio-init: buckets $artifact_bucket and $mlflow_bucket ready; user $platform_user has $policy"
