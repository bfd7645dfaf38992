from services.health_monitor.app import HealthMonitor
from shared.service import main

main("health-monitor", HealthMonitor)
