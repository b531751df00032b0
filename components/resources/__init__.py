"""The Pulumi components: each renders the configuration and the policies into Kubernetes
objects and Helm releases. `stack.py`'s `LlmStack` composes all of them; `__main__.py` only
wires it."""
