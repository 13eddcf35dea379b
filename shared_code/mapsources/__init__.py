"""Map sources: VM Insights Map tables, the Service Map API, VNet flow logs, Azure Migrate exports.

Each module reads one source and returns ``shared_code.domain.maps`` graphs; none knows of Table
Storage, Functions or the publishers.
"""
