"""Passes over statements (symrnn.stmt): each rewrites a module's sections without
changing what they compute, deciding from what statements read and write."""
