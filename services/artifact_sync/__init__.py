"""artifact-sync: copies each task's folder to shared storage (S3/MinIO or a network drive)."""
