from services.artifact_sync.app import ArtifactSync
from shared.service import main

main("artifact-sync", ArtifactSync)
