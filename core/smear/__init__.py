"""A smear photo to cells to a field read-out: segmentation, field calls, generated fields, ALL-IDB and other labs."""
