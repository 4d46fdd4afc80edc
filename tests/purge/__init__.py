"""Purge, schedule, pg_cron and the inspection views."""
