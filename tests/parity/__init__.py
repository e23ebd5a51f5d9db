"""The parity tests: the rows against the references (marker ``parity``) and their plumbing (fast tier)."""
