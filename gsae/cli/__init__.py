"""The command-line programs, one module each: they parse flags, print, and call the library
(which never imports them). ``gsae-groups``: :mod:`gsae.cli.groups`; ``gsae-train``:
:mod:`gsae.cli.train`; ``gsae-eval``: :mod:`gsae.cli.eval`; ``gsae-export``: :mod:`gsae.cli.export`;
``gsae-browse``: :mod:`gsae.cli.browse`; ``gsae-autointerp``: :mod:`gsae.cli.autointerp`."""
