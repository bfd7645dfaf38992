from services.gpu_worker.app import Worker
from shared.service import main

main("gpu-worker", Worker)
