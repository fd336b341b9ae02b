"""Building the next model from verified updates.

Pure strategy functions on tensors (like Flower's aggregate.py), the streaming aggregator over
update files, update compression, differential privacy and secure aggregation (its masking
arithmetic and blackboard protocol). Imports core, config and trust.
"""
