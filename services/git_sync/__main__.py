from services.git_sync.app import GitSync
from shared.service import main

main("git-sync", GitSync)
