"""WEMoE (Tang et al., ICML 2024, FusionBench's ``we_moe``): ``wemoe.py`` the method, ``wemoe_config.py`` its
options, ``wemoe_moe.py`` the routed MoE blocks (on the shared ``merging/lora_moe.py`` sites).

No imports here: the registry (``merging/__init__.py``) names each method's module."""
