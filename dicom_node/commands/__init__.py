"""Sub-commands of ``fpe-node``: one module each, discovered by :mod:`dicom_node.cli`."""
