"""``tradectl config ...``: the settings this machine's processes would run with.

``show`` prints every setting (``TP_*`` variable) with its value and whether it was set (by the
environment, ``.env`` or a secret file of ``TP_SECRETS_DIR``) or is the default. Secrets never
appear: ``SecretStr`` settings print ``***`` when set, and URLs print with their password
redacted (:meth:`shared.settings.Settings.shown`).
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from shared.cli.common import JsonOpt, load_settings, out

config_app = typer.Typer(help="This machine's settings (secrets hidden).", no_args_is_help=True)


@config_app.command("show")
def show(
    json_out: JsonOpt = False,
    only_set: Annotated[
        bool, typer.Option("--set", help="Only the settings not at their default.")
    ] = False,
) -> None:
    """Print every setting, its value (secrets as ***) and whether it is set or the default.

    Exit status 2 when a setting is invalid (the message names the variable).
    """
    rows = [row for row in load_settings().shown() if row[2] or not only_set]
    if json_out:
        print(json.dumps([{"variable": v, "value": x, "set": s} for v, x, s in rows], indent=2))
        return
    table = Table("variable", "value", "from")
    for variable, value, is_set in rows:
        table.add_row(variable, escape(value), "set" if is_set else "default")
    out.print(table)
