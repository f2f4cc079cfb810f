"""Prefect flows: orchestration only (schedules, retries, artifacts); stages run through DVC."""
