from services.scheduler.app import Scheduler
from shared.service import main

main("scheduler", Scheduler)
