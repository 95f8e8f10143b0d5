"""The Prefect flows: training and evaluation per category, the schedule, promotion, the production loop."""
