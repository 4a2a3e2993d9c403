"""Lightning wiring: the LightningModule, callbacks, checkpoint I/O and the training entry."""
