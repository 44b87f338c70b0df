"""Comparing systems: compare runs, the systems and their engine, prompt fitting, metrics
and the answer judge, result store and reports; and the dataset builder."""
