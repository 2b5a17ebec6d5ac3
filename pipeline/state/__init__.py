"""Where tasknotes keeps what must outlive a run: the ledger and the sink's events."""
