//! `metatrain certs`: make the cluster's CA and certificates (see `metatrain_common::net::pki`).

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use metatrain_common::net::pki;

#[derive(Subcommand, Debug)]
pub enum CertsCommand {
    /// Create a cluster CA and the coordinator's certificate in DIR.
    Init(InitArgs),
    /// Issue a worker certificate NAME (DIR/workers/NAME.crt and .key), signed by DIR's CA.
    Issue(IssueArgs),
}

#[derive(Args, Debug)]
pub struct InitArgs {
    /// The cluster's TLS directory (pass it to `metatrain train --tls-dir`).
    #[arg(long, default_value = "tls")]
    pub dir: PathBuf,
    /// Extra DNS names or IPs for the coordinator certificate (for workers that verify with --ca).
    #[arg(long = "host")]
    pub hosts: Vec<String>,
}

#[derive(Args, Debug)]
pub struct IssueArgs {
    /// The worker's name (1-64 of letters, digits, '-', '_', '.'): its authenticated identity in logs
    /// and metrics.
    pub name: String,
    /// The cluster's TLS directory (made by `certs init`, holding ca.crt and ca.key); the certificate
    /// and key are written to DIR/workers/NAME.crt and NAME.key.
    #[arg(long, default_value = "tls")]
    pub dir: PathBuf,
    /// Overwrite an existing certificate and key of this name (the old certificate stays valid until it
    /// expires; only its files are replaced).
    #[arg(long)]
    pub force: bool,
}

pub fn run(cmd: CertsCommand) -> Result<()> {
    match cmd {
        CertsCommand::Init(a) => {
            pki::init(&a.dir, &a.hosts).map_err(anyhow::Error::msg)?;
            println!(
                "created {0}/ca.crt, {0}/ca.key (keep private), {0}/coordinator.crt, {0}/coordinator.key",
                a.dir.display()
            );
        }
        CertsCommand::Issue(a) => {
            let existing = a.dir.join("workers").join(format!("{}.key", a.name));
            if existing.exists() && !a.force {
                anyhow::bail!("{} exists; pass --force to replace it", existing.display());
            }
            let (crt, key) = pki::issue(&a.dir, &a.name).map_err(anyhow::Error::msg)?;
            println!("issued {} and {}", crt.display(), key.display());
            println!(
                "  use: metatrain-worker run --coordinator HOST:PORT --ca {}/ca.crt --cert {} --key {}",
                a.dir.display(),
                crt.display(),
                key.display()
            );
        }
    }
    Ok(())
}
