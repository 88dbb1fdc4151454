"""`ps-cost`: predict how long a ps-cluster run takes and how many workers and servers to use.

`model` (the seed formula and the refined model, pure arithmetic), `calibrate` (probes on
this machine), `validate` (real ps-cluster runs against the predictions), `cli`.
"""
