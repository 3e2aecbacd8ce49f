"""Alembic migrations of the index (run by dicom_node.index.db.upgrade_to_head)."""
