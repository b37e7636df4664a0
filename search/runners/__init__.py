"""Runners execute a sweep: `ray` (Ray Tune, parallel, clusters) or `local` (in-process ask/tell)."""
