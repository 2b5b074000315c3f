"""The host-side agent. native.py decides first whether its hot modules run compiled
(mypyc) or as their Python sources."""

from agent import native

native.use_compiled()  # before anything imports the modules it names
