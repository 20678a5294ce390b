"""An example project that audits a ledger with a long-running turnout job."""
