"""`make bench`: the measuring instrument of outbox's figures (not part of `make test`)."""
