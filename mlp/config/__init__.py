"""The one schema (`schema`: every key's type, default, allowed values and when it acts)
and the check of a command line against it before Hydra starts (`command_line`).

May import: `mlp.training`, `mlp.core`, `mlp.data` (to read their defaults), `mlp.errors`,
OmegaConf and Hydra.
"""
