"""OCPP sources (CONTRACT §11): a CSMS endpoint whose frames feed the same ledger."""
