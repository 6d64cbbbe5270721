"""Aids for running without AWS: the Connect simulator (`chat-worker simulate`)."""
