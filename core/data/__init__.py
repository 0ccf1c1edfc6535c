"""Files to manifests, subject ids, splits and reviewers' labels; image reading; generated C-NMC-like cells."""
