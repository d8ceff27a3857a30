"""One module per tab: its layout, callbacks and event wiring."""
