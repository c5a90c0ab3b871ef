//! `iotp-pki`: the project CA on the command line (see the library's documentation and the
//! README's "Device identity and broker TLS").

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use iotp_pki::{
    check_registration, register_device, Ca, Issued, Registration, Target, Validity, BRIDGE_NAME,
};

#[derive(Parser)]
#[command(
    name = "iotp-pki",
    about = "The project CA: device, bridge and broker certificates, rotation, revocation, the CRL"
)]
struct Cli {
    /// The CA directory.
    #[arg(long, global = true, env = "IOTP_PKI_DIR", default_value = "pki")]
    dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the CA (ca.pem, ca.key 0600, index.toml, an empty crl.pem).
    Init {
        /// The CA certificate's CN.
        #[arg(long, default_value = "iotp device CA")]
        name: String,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issue a device's client certificate, CN `tenant/device` (its MQTT username).
    Issue {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        device: String,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Also register the device in this registry TOML (needs --profile).
        #[arg(long, requires = "profile")]
        registry: Option<PathBuf>,
        /// The device's profile in the registry.
        #[arg(long)]
        profile: Option<String>,
        /// The device's site in the registry.
        #[arg(long)]
        site: Option<String>,
    },
    /// Issue the bridge's client certificate (its username in the ACL).
    IssueBridge {
        #[arg(long, default_value = BRIDGE_NAME)]
        name: String,
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Issue the broker's server certificate, every --host a SAN.
    IssueBroker {
        /// Host name or IP address clients connect to (repeat).
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
        /// File name under broker/.
        #[arg(long, default_value = "mosquitto")]
        name: String,
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// A new certificate for a device; the old one is revoked (superseded), the CRL rewritten.
    Rotate {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        device: String,
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Revoke a device's certificates, or one by serial; rewrites the CRL. Send Mosquitto a
    /// SIGHUP afterwards: it reads the CRL again only then.
    Revoke {
        #[arg(long, requires = "device", conflicts_with = "serial")]
        tenant: Option<String>,
        #[arg(long, requires = "tenant")]
        device: Option<String>,
        /// Hex serial (as `list` prints it).
        #[arg(long, required_unless_present = "device")]
        serial: Option<String>,
    },
    /// Write the CRL again (it is valid --days days; Mosquitto refuses every client once it
    /// has expired).
    Crl {
        /// Where; default crl.pem in the CA directory.
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, default_value_t = 30)]
        days: u32,
    },
    /// Every certificate issued: serial, kind, subject, not after, status.
    List,
}

fn print_issued(issued: &Issued) {
    println!(
        "issued {} {} serial {} valid until {}\n  certificate {}\n  key         {}",
        match issued.entry.kind {
            iotp_pki::Kind::Device => "device",
            iotp_pki::Kind::Bridge => "bridge",
            iotp_pki::Kind::Broker => "broker",
        },
        issued.entry.subject,
        issued.entry.serial,
        issued.entry.not_after,
        issued.cert_file.display(),
        issued.key_file.display()
    );
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let dir = cli.dir;
    match cli.command {
        Command::Init { name, days } => {
            let ca = Ca::init(&dir, &name, days)?;
            println!(
                "CA created in {}: {} (key ca.key, mode 0600), CRL {}",
                dir.display(),
                ca.ca_file().display(),
                ca.crl_file().display()
            );
        }
        Command::Issue {
            tenant,
            device,
            days,
            registry,
            profile,
            site,
        } => {
            let mut ca = Ca::open(&dir)?;
            // Check the registry first: a registration that would fail issues nothing.
            if let (Some(path), Some(profile)) = (&registry, &profile) {
                check_registration(path, &tenant, &device, profile, site.as_deref())?;
            }
            let issued = ca.issue_device(&tenant, &device, Validity::days(days)?)?;
            print_issued(&issued);
            if let (Some(path), Some(profile)) = (registry, profile) {
                match register_device(&path, &tenant, &device, &profile, site.as_deref())? {
                    Registration::Added => {
                        println!("registered {tenant}/{device} in {}", path.display())
                    }
                    Registration::AlreadyThere => {
                        println!("{tenant}/{device} was already in {}", path.display())
                    }
                }
            }
        }
        Command::IssueBridge { name, days } => {
            let issued = Ca::open(&dir)?.issue_bridge(&name, Validity::days(days)?)?;
            print_issued(&issued);
        }
        Command::IssueBroker { hosts, name, days } => {
            let issued = Ca::open(&dir)?.issue_broker(&name, &hosts, Validity::days(days)?)?;
            print_issued(&issued);
        }
        Command::Rotate {
            tenant,
            device,
            days,
        } => {
            let issued = Ca::open(&dir)?.rotate(&tenant, &device, Validity::days(days)?)?;
            print_issued(&issued);
            println!(
                "the previous certificate is revoked; send Mosquitto a SIGHUP to load the CRL"
            );
        }
        Command::Revoke {
            tenant,
            device,
            serial,
        } => {
            let target = match (tenant, device, serial) {
                (Some(tenant), Some(device), None) => Target::Device { tenant, device },
                (None, None, Some(serial)) => Target::Serial(serial),
                _ => anyhow::bail!("give --tenant and --device, or --serial"),
            };
            let mut ca = Ca::open(&dir)?;
            for e in ca.revoke(&target)? {
                println!("revoked {} serial {}", e.subject, e.serial);
            }
            println!(
                "CRL written to {}; send Mosquitto a SIGHUP to load it",
                ca.crl_file().display()
            );
        }
        Command::Crl { out, days } => {
            let path = Ca::open(&dir)?.write_crl(out.as_deref(), days)?;
            println!("CRL written to {} (valid {days} days)", path.display());
        }
        Command::List => {
            let ca = Ca::open(&dir)?;
            let now = time::OffsetDateTime::now_utc();
            println!(
                "{:<34} {:<7} {:<8} {:<26} subject",
                "serial", "kind", "status", "not after"
            );
            for e in ca.list() {
                let kind = match e.kind {
                    iotp_pki::Kind::Device => "device",
                    iotp_pki::Kind::Bridge => "bridge",
                    iotp_pki::Kind::Broker => "broker",
                };
                println!(
                    "{:<34} {:<7} {:<8} {:<26} {}",
                    e.serial,
                    kind,
                    e.status(now),
                    e.not_after,
                    e.subject
                );
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("iotp-pki: {e:#}");
            ExitCode::from(1)
        }
    }
}
