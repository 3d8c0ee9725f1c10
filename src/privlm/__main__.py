"""``python -m privlm``: the same CLI as the ``privlm`` command."""

from privlm.cli import entry

entry()
