"""What every layer uses.

  config_lib.py  config files (configs/<name>.py), --set overrides, config dataclasses as dicts
  hosts.py       one global batch on every host: gathers, broadcasts and host-local views of global arrays
  sharding.py    device meshes, logical-axis sharding tables for parameters and batches, sharded loads
"""
