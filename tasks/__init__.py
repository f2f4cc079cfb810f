"""Thin Prefect tasks: each wraps one DVC or registry operation; no ML logic lives here."""
