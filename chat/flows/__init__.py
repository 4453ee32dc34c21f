"""PocketFlow flows: one node does one thing; each flow reads like its diagram."""
