"""Built-in recipes (YAML), installed as the ``hawqtool.recipes`` package."""
