"""Training data: Datasets (one pair -> one batch dict) and LightningDataModules."""
