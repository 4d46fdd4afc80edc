"""The receipt webhooks (outbox/webhooks.py) on a real server and database."""
