"""`sendsystem dkim keygen` and `sendsystem dkim dns`: the key and the record to publish.

``keygen`` writes a new 2048-bit RSA key (mode 0600, never over an existing
file) to ``[dkim] key_file`` or ``--out``; ``dns`` prints the TXT record for
``<selector>._domainkey.<domain>`` from the configured key, in the form a
zone file takes (long values split into 255-byte strings).
"""

from __future__ import annotations

from pathlib import Path

import click

from ..dkim import DkimSigner, generate_key
from ..errors import ConfigError
from . import Context, cli, pass_ctx, path_arg


@cli.group()
def dkim() -> None:
    """DKIM keys and the DNS record to publish."""


@dkim.command("keygen")
@click.option("--out", type=path_arg(dir_okay=False), default=None,
              help="Where to write the key (default: [dkim] key_file).")
@click.option("--bits", type=click.Choice(["1024", "2048", "3072", "4096"]), default="2048",
              show_default=True, help="RSA key size (2048 is what receivers expect).")
@pass_ctx
def keygen(ctx: Context, out: Path | None, bits: str) -> None:
    """Create a new RSA private key for DKIM signing."""
    path = out or ctx.config.dkim.key_file
    if path is None:
        raise ConfigError("No key file: pass --out FILE or set [dkim] key_file in config.ini.")
    generate_key(path, int(bits))
    click.echo(f"wrote {path} (RSA {bits}, mode 0600); publish the record from "
               "`sendsystem dkim dns`, then set [dkim] key_file to it")


@dkim.command("dns")
@pass_ctx
def dns(ctx: Context) -> None:
    """Print the DKIM TXT record for the configured key."""
    cfg = ctx.config.dkim
    if cfg.key_file is None or not cfg.domain or not cfg.selector:
        raise ConfigError("Set [dkim] domain, selector and key_file in config.ini first "
                          "(create the key with `sendsystem dkim keygen --out FILE`).")
    signer = DkimSigner.from_file(cfg.domain, cfg.selector, cfg.key_file)
    record = signer.dns_txt_record()
    # A TXT character-string holds at most 255 bytes; a 2048-bit key needs two.
    chunks = " ".join(f'"{record[i:i + 255]}"' for i in range(0, len(record), 255))
    click.echo(f"{signer.dns_name}. IN TXT ( {chunks} )")
