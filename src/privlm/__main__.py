"""``python -m privlm``: the same CLI as the ``privlm`` command."""

from privlm.cli import app

app(prog_name="privlm")
