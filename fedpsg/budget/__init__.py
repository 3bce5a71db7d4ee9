"""A party's own privacy budget: its policy, its lifetime ledger, and runs charged to it."""
