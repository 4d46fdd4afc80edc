"""`make bench`: the measuring instrument of issue 5 (not part of `make test`)."""
