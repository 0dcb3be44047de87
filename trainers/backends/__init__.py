"""The training backends (Lightning, TRL) behind one protocol, and what they share."""
