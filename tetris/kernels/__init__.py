"""Attention returning (out, lse), LSE merging, and attention over an SP group."""
