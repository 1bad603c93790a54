"""The cron service: APScheduler triggers that create jobs on time (see SPEC.md)."""
