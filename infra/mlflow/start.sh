#!/bin/sh
# Start the MLflow tracking server with its secrets read from files: the PostgreSQL password
# goes to libpq as PGPASSWORD and the S3 secret to boto3 as AWS_SECRET_ACCESS_KEY, so neither
# appears in a URL, an argument or the compose file. Clients log artifacts through this server
# (--serve-artifacts), so they need no S3 credentials of their own.
set -eu

secrets=${MLFLOW_SECRETS_DIR:-/run/secrets}
PGPASSWORD=$(cat "$secrets/postgres_password")
AWS_SECRET_ACCESS_KEY=$(cat "$secrets/tp_s3_secret_access_key")
export PGPASSWORD AWS_SECRET_ACCESS_KEY

exec mlflow server \
    --host 0.0.0.0 \
    --port 5000 \
    --backend-store-uri "${MLFLOW_BACKEND_STORE_URI:?}" \
    --serve-artifacts \
    --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION:?}" \
    --allowed-hosts "${MLFLOW_ALLOWED_HOSTS:-mlflow,mlflow:5000,localhost,localhost:5000,127.0.0.1,127.0.0.1:5000}" \
    "$@"
