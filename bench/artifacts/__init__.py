"""Artifact upload throughput: our artifact-sync path beside plain boto3, on one S3 server."""
